"""deploy/prometheus: the alert rules with promtool, their unit tests, and the
Prometheus Operator objects that wrap or point at them."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT
from system_tools import require_tool

PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "rankside-alerts.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.test.yml"))
OPERATIONS = ROOT / "docs" / "operations.md"
REQUIRED_ALERTS = {
    "RanksideWorkerStalled",
    "RanksideWorkerRestarting",
    "RanksideWorkerDown",
    "RanksideSidecarDown",
    "RanksideMetricConflicts",
    "RanksideCulpritNamed",
}


def promtool(*args: str | Path, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run(
        [tool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS
    result = promtool("test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests_annotations_and_a_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == REQUIRED_ALERTS
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in rules:
        name = rule["alert"]
        assert name in firing, f"no unit test where {name} fires"
        assert name in quiet, f"no unit test where {name} stays quiet"
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        doc, anchor = annotations["runbook"].split("#")
        assert doc == "docs/operations.md"
        assert anchor == name.lower() and anchor in headings, f"no runbook section for {name}"


def load_render_module() -> Any:
    spec = importlib.util.spec_from_file_location("render", PROM / "render_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_rendered_from_the_rules_file() -> None:
    render = load_render_module()
    text = (PROM / "prometheusrule.yaml").read_text()
    assert text == render.render(RULES.read_text()), (
        "prometheusrule.yaml is stale: run python deploy/prometheus/render_prometheusrule.py"
    )
    rule = yaml.safe_load(text)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_podmonitor_matches_the_kubernetes_examples() -> None:
    monitor = yaml.safe_load((PROM / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "rankside"} in endpoint["relabelings"]
    pods = 0
    for path in (ROOT / "deploy" / "kubernetes").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for template in _pod_templates(doc):
                pods += 1
                assert selector.items() <= template["metadata"]["labels"].items(), path
                ports = [
                    p["name"]
                    for c in template["spec"].get("initContainers", [])
                    for p in c.get("ports", [])
                ]
                assert endpoint["port"] in ports, path
    assert pods == 3


def _pod_templates(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            return [node]
        return [t for value in node.values() for t in _pod_templates(value)]
    if isinstance(node, list):
        return [t for value in node for t in _pod_templates(value)]
    return []


def test_scrape_config_examples(tmp_path: Path) -> None:
    result = promtool("check", "config", "scrape-config.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROM / "scrape-config-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "rankside"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {
        r["source_labels"][0]: r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert keep == {
        # The label rankside/sidecar=enabled and the port name of deploy/kubernetes.
        "__meta_kubernetes_pod_label_rankside_sidecar": "enabled",
        "__meta_kubernetes_pod_container_port_name": "rankside",
    }
    # Debian's Prometheus is built without Kubernetes discovery: check the rest
    # of the file with promtool, discovery swapped for a static target.
    job["static_configs"] = [{"targets": ["127.0.0.1:9478"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(RULES.read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
