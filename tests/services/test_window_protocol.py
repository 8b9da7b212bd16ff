"""One window over real gRPC between the real coordinator driver and three boundary agents:
secure aggregation at level 2 yields exactly the weighted average of the known deltas, also
when a boundary drops before or after masking, and the audit log records the rounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from echelon.audit.record import AuditRecord, PayloadType
from echelon.audit.store import read_records
from echelon.controller import SyncControllerConfig
from echelon.policy import ExportPolicy
from echelon.staleness import StalenessConfig
from echelon_proto.boundary.v1 import boundary_pb2
from echelon_tools.audit import main as audit_cli
from services.boundary_agent.runtime import RuntimeStage
from services.boundary_agent.servicer import BoundaryAgentServicer

from ..faults import FaultPlan, Stage
from .harness import TOKEN_UNIT, TRAINING, Sites, expected_phi, known_delta, known_tokens

# In-process and event-gated: a window takes seconds; a stuck gate fails here, not at 180 s.
pytestmark = pytest.mark.timeout(60)
ORGS = ["org-a", "org-b", "org-c"]
# Fixed point with 16 fraction bits: each coordinate of a sum of n weighted values is off by
# at most n * 2**-16; divided by the weight sum (>= 3 here) and scaled by lr*(1+m) = 1.33.
TOLERANCE = 1e-4


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path, ORGS)
    yield s
    s.close()


def _records(sites: Sites) -> list[AuditRecord]:
    return read_records(sites.root / "audit" / "log.db")


def test_secure_window_yields_the_weighted_average(sites: Sites) -> None:
    sites.heartbeat_all()
    outcome = sites.driver.step()
    assert outcome is not None and outcome.committed, outcome
    assert outcome.contributors == tuple(ORGS)
    phi = sites.store.load_adapter(outcome.version)
    np.testing.assert_allclose(phi, expected_phi(ORGS), atol=TOLERANCE)
    for agent in sites.agents.values():
        assert agent.runtime.held_version == 1
        np.testing.assert_allclose(agent.runtime.theta(), phi, atol=0)


def test_audit_log_holds_both_sides_of_every_crossing(sites: Sites) -> None:
    sites.heartbeat_all()
    assert sites.driver.step().committed  # type: ignore[union-attr]
    records = _records(sites)
    types = {r.payload_type for r in records}
    assert {
        PayloadType.MASKED_DELTA,
        PayloadType.UNMASKING_SHARES,
        PayloadType.SURVIVOR_LIST,
        PayloadType.KEY_ADVERTISEMENT,
        PayloadType.GLOBAL_ADAPTER,
    } <= types
    assert PayloadType.PLAIN_DELTA not in types
    report = sites.root / "report.json"
    code = audit_cli(
        ["verify", "--db", str(sites.root / "audit" / "log.db"), "--json", str(report)]
    )
    assert code == 0, report.read_text()


def test_boundary_that_never_submits_is_dropped_and_masks_cancel(tmp_path: Path) -> None:
    sites = Sites(tmp_path, ORGS, deadline_s=4.0, faults=FaultPlan().hold_at("org-c", TRAINING))
    try:
        sites.heartbeat_all()
        outcome = sites.driver.step()
        assert outcome is not None and outcome.committed, outcome
        assert outcome.contributors == ("org-a", "org-b")
        phi = sites.store.load_adapter(outcome.version)
        np.testing.assert_allclose(phi, expected_phi(["org-a", "org-b"]), atol=TOLERANCE)
        unmasked = [r for r in _records(sites) if r.payload_type == PayloadType.UNMASKING_SHARES]
        assert {r.sender for r in unmasked} >= {"org-a", "org-b"}
    finally:
        sites.close()


class DiesBeforeUnmasking(BoundaryAgentServicer):
    """An agent whose host vanishes after its masked delta was collected."""

    def ConfirmSurvivors(self, request, context):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.UNAVAILABLE, "host gone")

    def Unmask(self, request, context):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.UNAVAILABLE, "host gone")


def test_boundary_that_vanishes_after_masking_is_still_counted(tmp_path: Path) -> None:
    def servicer(*args, **kwargs):  # type: ignore[no-untyped-def]
        cls = DiesBeforeUnmasking if args[0].boundary == "org-c" else BoundaryAgentServicer
        return cls(*args, **kwargs)

    sites = Sites(tmp_path, ORGS, servicer_class=servicer)
    try:
        sites.heartbeat_all()
        outcome = sites.driver.step()
        assert outcome is not None and outcome.committed, outcome
        # Its masked input is in the sum; survivors revealed its self-mask seed.
        phi = sites.store.load_adapter(outcome.version)
        np.testing.assert_allclose(phi, expected_phi(ORGS), atol=TOLERANCE)
    finally:
        sites.close()


def test_window_below_m_min_aborts_and_deltas_roll_over(tmp_path: Path) -> None:
    faults = FaultPlan().hold_at("org-b", TRAINING, window=1)
    sites = Sites(tmp_path, ["org-a", "org-b"], deadline_s=3.0, faults=faults)
    try:
        sites.heartbeat_all()
        outcome = sites.driver.step()
        assert outcome is not None and not outcome.committed
        assert sites.driver.version == 0
        assert sites.agents["org-a"].runtime.status()["has_pending"] == 1.0  # kept, not lost
        faults.release("org-b", TRAINING, window=1)
        sites.heartbeat_all()
        second = sites.driver.step()
        assert second is not None and second.committed, second
        phi = sites.store.load_adapter(second.version)
        np.testing.assert_allclose(phi, expected_phi(["org-a", "org-b"]), atol=TOLERANCE)
        assert sites.agents["org-a"].trainer.calls == [1]  # the rolled-over delta, not retrained
    finally:
        sites.close()


def test_plain_baseline_is_marked_and_exact(tmp_path: Path) -> None:
    sites = Sites(tmp_path, ORGS, level2=False)
    try:
        sites.heartbeat_all()
        outcome = sites.driver.step()
        assert outcome is not None and outcome.committed
        phi = sites.store.load_adapter(outcome.version)
        np.testing.assert_allclose(phi, expected_phi(ORGS), atol=1e-6)
        records = _records(sites)
        assert any(r.payload_type == PayloadType.PLAIN_DELTA for r in records)
        assert all(not r.levels.level2 for r in records)
    finally:
        sites.close()


def test_open_window_request_is_validated(sites: Sites) -> None:
    stub = sites.agents["org-a"].stub()
    request = boundary_pb2.OpenWindowRequest(inner_steps=2, deadline_unix_ms=1, token_unit=1.0)
    request.ref.window, request.ref.nonce = 5, b"n" * 16
    request.cohort.add(boundary="org-b", party=0, identity_key=b"k" * 32)
    with pytest.raises(grpc.RpcError) as err:
        stub.OpenWindow(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cohort" in (err.value.details() or "")


def test_sync_controller_lengthens_h_while_boundaries_agree(tmp_path: Path) -> None:
    controller = SyncControllerConfig(h_min=2, h_max=16, agreement_high=0.5, patience=1)
    sites = Sites(tmp_path, ORGS, controller=controller)
    try:
        for _ in range(3):
            sites.heartbeat_all()
            assert sites.driver.step().committed  # type: ignore[union-attr]
        # The same known deltas every window: agreement ~0.6 and cosine 1 are calm signals,
        # so H grows by 1.5x each window from the configured 2 (rounded): 2, 3, 4.
        assert sites.agents["org-a"].trainer.steps == [2, 3, 4]
        assert sites.driver.inner_steps == 6
    finally:
        sites.close()


def test_delay_aware_boundaries_train_while_the_window_is_in_flight(tmp_path: Path) -> None:
    sites = Sites(tmp_path, ORGS)
    for agent in sites.agents.values():
        agent.runtime.set_run(
            StalenessConfig(), ExportPolicy(k_min=2, clip_norm=10.0), delay_aware=True
        )
    try:
        sites.heartbeat_all()
        assert sites.driver.step().committed  # type: ignore[union-attr]
        trainer = sites.agents["org-a"].trainer
        # The overlap started from theta_submitted = theta_0 - delta while window 1 was open.
        sites.faults.wait("org-a", TRAINING, window=1, times=2)
        np.testing.assert_allclose(trainer.thetas[1], -known_delta("org-a"), atol=1e-7)
        # Its progress was re-based onto version 1 and is contributed at once, staleness 0.
        sites.heartbeat_all()
        second = sites.driver.step()
        assert second is not None and second.committed
        assert trainer.calls[:2] == [1, 1]
        g = expected_phi(ORGS) / (-0.7 * 1.9)  # the same pseudo-gradient in both windows
        m = 0.9 * g + g
        np.testing.assert_allclose(
            sites.store.load_adapter(2), expected_phi(ORGS) - 0.7 * (g + 0.9 * m), atol=2e-4
        )
    finally:
        sites.close()


def test_buffered_window_does_not_wait_and_the_late_delta_counts_with_its_staleness(
    tmp_path: Path,
) -> None:
    # org-c is late for window 1; in window 2, org-b is the one still training.
    faults = FaultPlan().hold_at("org-c", TRAINING, window=1).hold_at("org-b", TRAINING, window=2)
    sites = Sites(tmp_path, ORGS, buffer_k=2, faults=faults)
    try:
        sites.heartbeat_all()
        first = sites.driver.step()
        assert first is not None and first.contributors == ("org-a", "org-b")  # K = 2: no wait
        faults.release("org-c", TRAINING, window=1)
        faults.wait("org-c", RuntimeStage.DELTA_READY, window=1)  # its base-0 delta waits
        sites.heartbeat_all()
        second = sites.driver.step()
        assert second is not None and second.contributors == ("org-a", "org-c")
        # org-c contributes its version-0 delta one version late: weight tokens/unit * 2**-0.5.
        weights = {b: known_tokens(b) / TOKEN_UNIT for b in ORGS}
        weights["org-c"] *= 2**-0.5
        g1 = sum(known_tokens(b) * known_delta(b).astype(np.float64) for b in ("org-a", "org-b"))
        g1 /= sum(known_tokens(b) for b in ("org-a", "org-b"))
        contributors = second.contributors
        g2 = sum(weights[b] * known_delta(b).astype(np.float64) for b in contributors)
        g2 /= sum(weights[b] for b in contributors)
        phi1 = -0.7 * 1.9 * g1
        phi2 = phi1 - 0.7 * (g2 + 0.9 * (0.9 * g1 + g2))
        np.testing.assert_allclose(sites.store.load_adapter(2), phi2, atol=2e-4)
    finally:
        sites.close()


def test_a_delta_beyond_tau_max_is_dropped_and_audited(tmp_path: Path) -> None:
    # org-c is late for window 1; in window 2 the fresh deltas wait until org-c's stale one
    # has been collected and dropped, so the drop happens inside the window.
    dropped_c = Stage("org-c", RuntimeStage.CONTRIBUTION_DROPPED, window=2)
    faults = (
        FaultPlan()
        .hold_at("org-c", TRAINING, window=1)
        .hold_at("org-a", TRAINING, window=2, until=dropped_c)
        .hold_at("org-b", TRAINING, window=2, until=dropped_c)
    )
    sites = Sites(tmp_path, ORGS, buffer_k=2, faults=faults)
    late = sites.agents["org-c"]
    late.runtime.set_run(StalenessConfig(tau_max=0), ExportPolicy(k_min=2, clip_norm=10.0))
    try:
        sites.heartbeat_all()
        assert sites.driver.step().contributors == ("org-a", "org-b")  # type: ignore[union-attr]
        faults.release("org-c", TRAINING, window=1)
        faults.wait("org-c", RuntimeStage.DELTA_READY, window=1)
        sites.heartbeat_all()
        second = sites.driver.step()
        assert second is not None and second.contributors == ("org-a", "org-b")
        dropped = [r for r in _records(sites) if r.payload_type == PayloadType.CONTRIBUTION_DROPPED]
        assert [(r.sender, r.window, r.attributes.staleness) for r in dropped] == [  # type: ignore[union-attr]
            ("org-c", 2, 1)
        ]
        assert late.runtime.status()["has_pending"] == 0.0  # nothing kept, nothing counted
        assert faults.count("org-c", RuntimeStage.CONTRIBUTION_DROPPED) == 1
    finally:
        sites.close()
