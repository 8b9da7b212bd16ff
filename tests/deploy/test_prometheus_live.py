"""A real Prometheus against a running multi-site system: the audit log, the coordinator
and two organizations' agents as processes on ephemeral loopback ports, scraped by the
committed configurations of deploy/prometheus/ (the global plane's Prometheus and
org-a's own, each with its rules), with only targets and intervals changed.

Every metric selector in the loaded alert rules and in the dashboard's queries returns
series from the Prometheus that evaluates or answers it, every target is up, every rule
is healthy, and the dashboard renders from live data (echelon_tools.dashboard).
Skips without the prometheus binary unless REQUIRE_DEPLOY_TOOLS=1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from echelon_tools.dashboard import expand, load_queries, render, selectors
from echelon_tools.dashboard_shot import lean_spec, start_planes
from echelon_tools.launcher import Deployment
from echelon_tools.prometheus_live import PrometheusAPI, PrometheusServer

from .test_prometheus_rules import need_tool

pytestmark = pytest.mark.timeout(300)
DEADLINE_S = 60.0  # for the scrapes and rule evaluations to have happened


@dataclass
class Live:
    deployment: Deployment
    servers: dict[str, PrometheusServer]  # "global", "organization" (org-a's)

    def api(self, plane: str) -> PrometheusAPI:
        return self.servers[plane].api


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    need_tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus-live")
    with Deployment(lean_spec(root)) as deployment:
        deployment.start(timeout_s=180)
        deployment.wait_windows(1, timeout_s=180)  # participation, bytes and stages exist
        servers = start_planes(deployment, root / "prometheus")
        try:
            yield Live(deployment, servers)
        finally:
            for server in servers.values():
                server.stop()


def missing_series(api: PrometheusAPI, wanted: set[str]) -> set[str]:
    return {s for s in wanted if not api.query(f"count({s})")}


def wait_for_series(api: PrometheusAPI, wanted: set[str], deadline_s: float) -> set[str]:
    """Polls until every selector returns series (or the deadline); returns those that
    still return none."""
    give_up = time.monotonic() + deadline_s
    missing = missing_series(api, wanted)
    while missing and time.monotonic() < give_up:
        time.sleep(0.5)
        missing = missing_series(api, missing)
    return missing


def test_every_target_is_scraped_and_up(live: Live) -> None:
    for plane, server in live.servers.items():
        give_up = time.monotonic() + DEADLINE_S
        targets = server.api.targets()
        while time.monotonic() < give_up and not (
            targets and all(t["health"] == "up" for t in targets)
        ):
            time.sleep(0.5)  # a target's health is "unknown" until its first scrape
            targets = server.api.targets()
        jobs = sorted(t["labels"]["job"] for t in targets)
        want = (
            ["echelon-agent"]
            if plane == "organization"
            else ["echelon-audit-log", "echelon-coordinator"]
        )
        assert jobs == want, jobs
        assert all(t["health"] == "up" for t in targets), targets


def test_every_selector_of_the_loaded_alert_rules_returns_series(live: Live) -> None:
    for plane, server in live.servers.items():
        rules = server.api.rules()
        alerts = {r["name"] for r in rules if r["type"] == "alerting"}
        assert len(alerts) >= 6, (plane, alerts)
        wanted = {s for r in rules for s in selectors(r["query"])}
        missing = wait_for_series(server.api, wanted, DEADLINE_S)
        assert not missing, f"{plane}: alert rules select metrics with no series: {sorted(missing)}"
        # every rule has been evaluated by now, without error
        give_up = time.monotonic() + DEADLINE_S
        while time.monotonic() < give_up:
            rules = server.api.rules()
            if all(r["health"] == "ok" for r in rules):
                break
            time.sleep(0.5)
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]


def test_every_selector_of_the_dashboard_returns_series(live: Live) -> None:
    queries = load_queries()
    for plane in ("global", "organization"):
        wanted = {s for q in queries if q.plane == plane for s in selectors(q.expr)}
        assert wanted
        missing = wait_for_series(live.api(plane), wanted, DEADLINE_S)
        assert not missing, f"{plane}: dashboard selectors with no series: {sorted(missing)}"


def test_every_dashboard_query_is_valid_promql_on_live_data(live: Live) -> None:
    for q in load_queries():
        live.api(q.plane).query(expand(q.expr))  # raises PrometheusError on a bad query


def test_the_dashboard_renders_from_live_data(live: Live) -> None:
    apis = {plane: live.api(plane) for plane in ("global", "organization")}
    page = render(load_queries(), apis, minutes=5)
    for title in {q.panel for q in load_queries()}:
        assert title.replace("'", "&#x27;") in page
    # the stat panels show a number: the global version and the time since the last commit
    assert page.count('class="empty"') < len({q.panel for q in load_queries()}) // 2, page


def value(api: PrometheusAPI, expr: str) -> float:
    result = api.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def test_the_new_metrics_carry_the_runs_values(live: Live) -> None:
    """After a committed window: both boundaries contributed (none missing a window), the
    collect stage was timed, the last commit is recent, org-a runs its two devices with no
    restart, and its agent and the coordinator witnessed the log without a failure."""
    glob, org = live.api("global"), live.api("organization")
    assert not wait_for_series(glob, {"echelon_coordinator_boundary_contributions_total"}, 30)
    missed = glob.query("echelon_coordinator_boundary_missed_windows")
    assert {s["metric"]["boundary"] for s in missed} == {"org-a", "org-b"}
    assert value(glob, "max(echelon_coordinator_boundary_missed_windows)") <= 1
    assert value(glob, 'echelon_coordinator_secagg_stage_seconds_count{stage="collect"}') >= 1
    assert value(glob, "time() - echelon_coordinator_last_commit_timestamp_seconds") < 300
    assert value(org, "echelon_agent_expected_workers") == 2
    assert value(org, "echelon_agent_alive_workers") == 2
    assert value(org, "echelon_agent_worker_restarts_total") == 0
    for api in (glob, org):
        assert value(api, 'sum(echelon_audit_witness_checks_total{outcome="inconsistent"})') == 0
        assert value(api, "sum(echelon_audit_egress_halts_total)") == 0
    assert value(org, 'echelon_audit_witness_checks_total{outcome="ok"}') >= 1
