"""deploy/grafana/: the provisioned dashboard references only metrics the services export,
shows every kind of metric an operator needs, and picks its Prometheus by variable (the
global plane's, or an organization's own)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from echelon_tools.dashboard import DASHBOARD, load_queries, metric_name, selectors

from .test_prometheus_rules import PROMETHEUS_SERIES, exported_samples

GRAFANA = DASHBOARD.parents[1]
# What issue 12 asks the dashboard to show, each with a metric that shows it.
REQUIRED = {
    "throughput": "echelon_agent_tokens_total",
    "window latency": "echelon_coordinator_window_seconds_bucket",
    "window outcome": "echelon_coordinator_windows_total",
    "participation": "echelon_coordinator_boundary_contributions_total",
    "dropouts": "echelon_coordinator_dropouts_total",
    "staleness": "echelon_coordinator_max_staleness_versions",
    "H": "echelon_coordinator_inner_steps",
    "drift": "echelon_coordinator_drift_rms_ratio",
    "loss": "echelon_agent_val_loss",
    "bytes crossing, out": "echelon_cross_boundary_bytes_sent_total",
    "bytes crossing, in": "echelon_cross_boundary_bytes_received_total",
    "secure-aggregation stages": "echelon_coordinator_secagg_stage_seconds_bucket",
    "audit tree size": "echelon_audit_tree_entries",
    "append latency": "echelon_audit_append_seconds_bucket",
    "witness failures": "echelon_audit_witness_checks_total",
    "worker health": "echelon_agent_alive_workers",
    "worker restarts": "echelon_agent_worker_restarts_total",
    "last committed version": "echelon_coordinator_last_commit_timestamp_seconds",
    "build": "echelon_build_info",
}


def test_the_dashboard_references_only_exported_metrics() -> None:
    exported = exported_samples() | PROMETHEUS_SERIES
    queries = load_queries()
    assert len(queries) >= 40
    for q in queries:
        names = [metric_name(s) for s in selectors(q.expr)]
        assert names, f"{q.panel}: {q.expr} selects no metric"
        unknown = set(names) - exported
        assert not unknown, f"panel {q.panel!r} queries {sorted(unknown)}, which no service exports"


def test_the_dashboard_shows_every_metric_an_operator_needs() -> None:
    shown = {metric_name(s) for q in load_queries() for s in selectors(q.expr)}
    missing = {what: name for what, name in REQUIRED.items() if name not in shown}
    assert not missing, missing


def test_organization_statistics_come_from_the_organizations_own_prometheus() -> None:
    """An agent's metrics are scraped by its organization's Prometheus only; the global
    plane's panels never query them, and the organization's panels query only the agent's
    and the shared metrics that an agent exports too."""
    for q in load_queries():
        names = {metric_name(s) for s in selectors(q.expr)}
        if q.plane == "global":
            assert not {n for n in names if n.startswith("echelon_agent_")}, q
        else:
            assert not {
                n for n in names if n.startswith(("echelon_coordinator_", "echelon_audit_t"))
            }, q


def test_the_dashboard_is_provisioned_with_its_datasources() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"global", "organization"} <= set(variables)
    assert all(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables.values())
    datasources = (GRAFANA / "provisioning" / "datasources" / "echelon.yml").read_text()
    names = re.findall(r"- name: (.+)", datasources)
    for variable in variables.values():
        pattern = variable["regex"].strip("/")
        assert any(re.fullmatch(pattern, n) for n in names), (variable["name"], names)
    provider = (GRAFANA / "provisioning" / "dashboards" / "echelon.yml").read_text()
    assert "type: file" in provider and "path: /var/lib/grafana/dashboards/echelon" in provider
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_selectors_are_the_metric_names_with_their_matchers() -> None:
    expr = (
        'sum by (job, instance) (increase(a_total{outcome="x"}[15m])) > 0 '
        "or on() histogram_quantile(0.9, sum(rate(b_bucket[$__rate_interval])) by (le)) "
        "unless time() - c > 15 * 60"
    )
    assert selectors(expr) == ['a_total{outcome="x"}', "b_bucket", "c"]
    assert Path(DASHBOARD).is_file()
