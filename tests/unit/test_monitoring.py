"""The example alert rules and Grafana dashboard in docs/monitoring: valid for promtool,
alerting when they should (promtool's rule unit tests), and naming only metrics and labels
the exporter publishes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsgate.reports.exporter import Snapshot, render

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docs" / "monitoring"
ALERTS = MONITORING / "opsgate-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\bopsgate_[a-z_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run `make system-deps` (Debian: prometheus)")
    return found


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60, check=False
    )


def published() -> dict[str, set[str]]:
    """Metric names the exporter exposes (histograms with their series), with labels."""
    names: dict[str, set[str]] = {}
    for family in render(Snapshot()):
        labels: set[str] = set()
        suffixes = [""]
        if family.type == "histogram":
            suffixes = ["_bucket", "_count", "_sum"]
        elif family.type == "counter":
            suffixes = ["_total"] if not family.name.endswith("_total") else [""]
        documentation_labels = getattr(family, "_labelnames", ())
        labels.update(documentation_labels)
        for suffix in suffixes:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    names["opsgate_store_up"] = set()
    return names


def dashboard_exprs() -> list[str]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in document["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alert_rules_fire_as_their_unit_tests_say(promtool: str) -> None:
    result = run(promtool, "test", "rules", "opsgate-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_promtool(promtool: str, tmp_path: Path) -> None:
    # The unit tests can fail: demand the stale-approval alert 10 minutes too early.
    tests = yaml.safe_load((MONITORING / "opsgate-alerts.test.yml").read_text())
    tests["rule_files"] = [str(ALERTS)]
    tests["tests"] = tests["tests"][:1]
    tests["tests"][0]["alert_rule_test"][1]["eval_time"] = "30m"
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(tests))
    result = run(promtool, "test", "rules", str(broken))
    assert result.returncode != 0


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_name_only_published_metrics() -> None:
    names = published()
    assert "opsgate_oldest_pending_approval_age_seconds" in names
    assert {"outcome", "action", "environment"} <= names["opsgate_verification_outcomes_total"]
    used = set(METRIC.findall(ALERTS.read_text())) | {
        name for expr in dashboard_exprs() for name in METRIC.findall(expr)
    }
    assert used and used <= set(names), used - set(names)
    # Labels the rules group by exist on the metrics they read.
    alerts = yaml.safe_load(ALERTS.read_text())
    for rule in alerts["groups"][0]["rules"]:
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            for label in (x.strip() for x in by.split(",")):
                metrics = set(METRIC.findall(rule["expr"]))
                assert any(label in names[m] for m in metrics), (rule["alert"], label)
