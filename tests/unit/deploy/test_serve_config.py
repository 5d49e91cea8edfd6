"""deploy/: every metric the dashboards and alert rules use is one the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from router.metrics import RouterMetrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
METRIC = re.compile(r"\bgpugate_[a-z_]+\b")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in RouterMetrics(None).registry.collect():
        names.update(family.name + s for s in _SUFFIXES[family.type])
    return names


def dashboard_exprs(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    assert data["uid"] and data["title"] and data["panels"]
    exprs = [t["expr"] for p in data["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in data["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs(path: Path) -> tuple[list[str], set[str]]:
    data = yaml.safe_load(path.read_text())
    exprs, recorded = [], set()
    for group in data["groups"]:
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            exprs.append(rule["expr"])
            if "record" in rule:
                recorded.add(rule["record"])
            else:
                assert rule["labels"]["severity"] in {"page", "ticket"}
                anchor = rule["annotations"]["runbook"].split("#", 1)[1]
                runbooks = (DEPLOY / "runbooks.md").read_text()
                assert f"## {anchor}" in runbooks, anchor
    return exprs, recorded


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana").glob("*.json")), ids=lambda p: p.name)
def test_dashboards_use_only_exported_metrics(path: Path) -> None:
    used = {m for e in dashboard_exprs(path) for m in METRIC.findall(e)}
    assert used, "a dashboard with no gpugate metric"
    assert used <= exported_names(), used - exported_names()


def test_alert_rules_use_only_exported_metrics_and_their_own_recordings() -> None:
    exprs, recorded = rule_exprs(DEPLOY / "prometheus" / "gpugate-alerts.yaml")
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used <= exported_names(), used - exported_names()
    referenced = {m for e in exprs for m in re.findall(r"\bgpugate:[a-z0-9_:]+", e)}
    assert referenced <= recorded, referenced - recorded


def test_the_checker_catches_a_metric_that_does_not_exist() -> None:
    assert "gpugate_requests_total" in exported_names()
    assert "gpugate_request_duration_seconds_bucket" in exported_names()
    assert "gpugate_requests" not in exported_names()  # counters end in _total
    assert "gpugate_tenant_cost_usd_total" not in exported_names()
