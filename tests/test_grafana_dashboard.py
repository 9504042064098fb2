"""deploy/grafana: every metric name in the dashboard (and in the alert rules)
is one that a real sidecar exports, and every expression is valid PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, SidecarProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families
from system_tools import require_tool

DASHBOARD = ROOT / "deploy" / "grafana" / "rankside-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "rankside-alerts.yml"
# Series Prometheus itself makes for every target.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Grafana's variables, replaced by plausible values to get plain PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$job": "rankside",
    "$instance": ".*",
}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "atan2",
}  # fmt: skip
REQUIRED_PANELS = (
    "Workers up",
    "Steps per second by rank",
    "Step time quantiles",
    "Slowest rank",
    "Stalled ranks",
    "Stalls",
    "Restarts",
    "CUDA memory allocated by rank",
)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_expressions() -> list[str]:
    data = dashboard()
    exprs = [t["expr"] for p in all_panels(data["panels"]) for t in p.get("targets", [])]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def to_promql(expr: str) -> str:
    """Grafana's variables replaced; ``label_values(m, l)`` becomes ``m``."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", expr, re.S)
    return found.group(1) if found else expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression.

    Strings, label matchers, ranges and grouping clauses go first; what is
    left that looks like a name, is no keyword and is not called is a metric.
    """
    text = to_promql(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if name.lower() in KEYWORDS or following.startswith("("):
            continue
        if re.match(r"\d", text[match.start() - 1 : match.start()] or " "):
            continue  # the unit of a number like 5m, or an exponent
        names.add(name)
    return names


def test_metric_name_extraction() -> None:
    assert metric_names(
        'sum by (instance, rank) (rate(a_total{job="$job", x=~"b c"}[$__rate_interval]))'
        " / on (rank) group_left (x) b_count offset 5m"
    ) == {"a_total", "b_count"}
    assert metric_names("scalar(max(step)) - step > bool 1e3") == {"step"}
    assert metric_names('label_values(w{job="$job"}, instance)') == {"w"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))") == {"h_bucket"}


def test_dashboard_structure() -> None:
    data = dashboard()
    panels = list(all_panels(data["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for title in REQUIRED_PANELS:
        assert title in titles, f"no panel {title!r}"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["description"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            # Every query is about the chosen job's nodes.
            assert 'job="$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression, as a recording rule of a scratch rules file."""
    promtool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": to_promql(expr)}
        for i, expr in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(sidecar: SidecarProcess) -> set[str]:
    text = sidecar.client.get("/metrics").text
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_every_metric_name_is_exported_by_a_real_sidecar(
    sidecar_factory: Any, spawn_worker: Any
) -> None:
    """Dashboard and alert rules use only names that a sidecar's /metrics has.

    A sidecar with a running worker (on a stand-in CUDA device), a worker
    that ended, a relayed call and a stalled worker, whose incident names the
    rank that ended as its culprit: the families that appear only once
    something happened are there too.
    """
    sidecar: SidecarProcess = sidecar_factory("--stall-after", "1.5")
    spawn_worker("fake_cuda_worker.py", rank=0, env={"TORCHELASTIC_RESTART_COUNT": "1"})
    spawn_worker("train_loop.py", "3", rank=1)
    sidecar.wait_workers(1, state="exited")
    sidecar.client.post("/api/v1/handlers/dump_traceback")
    spawn_worker("staller.py", "sleep", "5", "60", rank=2)
    wanted = {
        "rankside_worker_cuda_memory_allocated_bytes",
        "rankside_worker_step_duration_seconds_count",
        "rankside_handler_calls_total",
        "rankside_incident_culprit",
    }
    names: set[str] = wait_for(
        lambda: (found := exported_names(sidecar)) >= wanted and found,
        timeout=20,
        what="the CUDA, step-time and culprit series",
    )
    used = {n for e in dashboard_expressions() for n in metric_names(e)}
    used_by_rules = {n for e in rule_expressions() for n in metric_names(e)}
    assert "rankside_worker_step_duration_seconds_bucket" in used
    assert "rankside_worker_cuda_memory_allocated_bytes" in used
    missing = sorted((used | used_by_rules) - names - SCRAPE_SERIES)
    assert missing == [], f"not exported by the sidecar: {missing}"
