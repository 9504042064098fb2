"""Write prometheusrule.yaml, the Prometheus Operator's wrapping of the rules file.

    python deploy/prometheus/render_prometheusrule.py

rules/rankside-alerts.yml is the one source of the alerts; the test suite
checks that prometheusrule.yaml is what this script makes of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules" / "rankside-alerts.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# Generated from rules/rankside-alerts.yml by render_prometheusrule.py: edit
# that file, then run `python deploy/prometheus/render_prometheusrule.py`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: rankside
  labels:
    app.kubernetes.io/part-of: rankside
    # Match your Prometheus resource's ruleSelector.
    prometheus: k8s
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule: the rules file, comments and all, under ``spec``."""
    body = "".join(
        f"  {line}" if line.strip() else line for line in rules_text.splitlines(keepends=True)
    )
    return HEADER + body


def main() -> int:
    TARGET.write_text(render(RULES.read_text()))
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
