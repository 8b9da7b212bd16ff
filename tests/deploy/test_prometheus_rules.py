"""deploy/prometheus/ as promtool sees it: the scrape configurations and alert rules are
valid, and the rules' unit tests (rules_test.yml) make every alert fire and resolve; the
rules name only metrics the services export, and each alert has its runbook section.

Tests that need promtool skip when it is absent, unless REQUIRE_DEPLOY_TOOLS=1
(then they fail): `tools/install_prometheus.sh` installs it."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from echelon_tools.prometheus_live import PROMETHEUS_DIR

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(PROMETHEUS_DIR.glob("*.yml"), key=lambda p: p.name)
SCRAPE_CONFIGS = [p for p in CONFIGS if p.name != "rules_test.yml"]
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
METRICS_MODULES = (
    "services.common.metrics",
    "services.audit_log.metrics",
    "services.global_coordinator.metrics",
    "services.boundary_agent.metrics",
)
# Prometheus' own series that rules and dashboards may use besides the services' metrics.
PROMETHEUS_SERIES = {"up", "ALERTS"}


def need_tool(name: str) -> str:
    """The binary's path; skips without it unless REQUIRE_DEPLOY_TOOLS=1."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: run tools/install_prometheus.sh (as root)"
    if os.environ.get("REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"REQUIRE_DEPLOY_TOOLS=1 and {message}")
    pytest.skip(message)


def exported_samples() -> set[str]:
    """Every sample name the services' metrics modules expose (a counter as `_total`, a
    histogram as its `_bucket`, `_sum` and `_count`)."""
    for module in METRICS_MODULES:
        importlib.import_module(module)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("echelon_")
        for suffix in suffixes.get(family.type, ("",))
    }


def alert_names(path: Path) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", path.read_text(), flags=re.MULTILINE)


def test_the_deploy_folder_holds_the_global_and_one_config_per_organization() -> None:
    names = {p.name for p in SCRAPE_CONFIGS}
    assert {"global.yml", "organization-org-a.yml", "organization-org-b.yml"} <= names
    for path in SCRAPE_CONFIGS:
        text = path.read_text()
        jobs = re.findall(r"job_name: (\S+)", text)
        if path.name.startswith("organization-"):
            # an organization's Prometheus scrapes its own agent and nothing else
            assert jobs == ["echelon-agent"], (path.name, jobs)
            assert f"organization: {path.stem.removeprefix('organization-')}" in text
        else:
            assert jobs == ["echelon-coordinator", "echelon-audit-log"], jobs


@pytest.mark.parametrize("config", SCRAPE_CONFIGS, ids=lambda p: p.name)
def test_promtool_checks_the_scrape_config(config: Path) -> None:
    promtool = need_tool("promtool")
    run = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_promtool_checks_the_rules() -> None:
    promtool = need_tool("promtool")
    run = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(RULES)


def test_promtool_unit_tests_make_every_alert_fire_and_resolve() -> None:
    promtool = need_tool("promtool")
    run = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS_DIR,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_the_unit_tests_cover_every_alert_both_ways() -> None:
    """Each alert of each rule file has a case where it fires (exp_alerts with an entry) and
    one where it is resolved (exp_alerts: []), in rules_test.yml, which loads every file."""
    text = RULES_TEST.read_text()
    loaded = re.findall(r"^\s+- (rules/\S+\.yml)$", text, flags=re.MULTILINE)
    assert sorted(loaded) == sorted(f"rules/{p.name}" for p in RULES)
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text)
    fired = {name for name, empty in cases if not empty}
    resolved = {name for name, empty in cases if empty}
    alerts = {name for path in RULES for name in alert_names(path)}
    assert len(alerts) >= 10
    assert alerts == fired, f"never fires in rules_test.yml: {sorted(alerts - fired)}"
    assert alerts == resolved, f"never resolves in rules_test.yml: {sorted(alerts - resolved)}"


def test_the_required_alerts_exist() -> None:
    alerts = {name for path in RULES for name in alert_names(path)}
    required = {
        "EchelonBoundaryMissingWindows",  # a boundary missing N windows
        "EchelonNoNewVersion",  # no new version for T minutes
        "EchelonAuditWitnessFailure",  # audit witness or verification failure
        "EchelonAuditRecordRefused",
        "EchelonStalenessHigh",  # staleness above a threshold
        "EchelonWorkerRestartLoop",  # a worker restarting in a loop
    }
    assert required <= alerts, sorted(required - alerts)


def test_the_rules_name_only_exported_metrics() -> None:
    exported = exported_samples() | PROMETHEUS_SERIES
    for path in RULES:
        named = set(re.findall(r"\b(echelon_[a-z0-9_]+)", path.read_text()))
        assert named, path
        assert named <= exported, f"{path.name}: {sorted(named - exported)}"


def test_every_alert_has_a_runbook_section() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    headings = set(re.findall(r"^#### (\w+)$", doc, flags=re.MULTILINE))
    for path in RULES:
        text = path.read_text()
        for name in alert_names(path):
            assert name in headings, f"docs/operations.md has no '#### {name}' section"
            assert f"runbook: docs/operations.md#{name.lower()}" in text, name
