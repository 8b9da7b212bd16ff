"""Windows over the real dial-out sessions (the coordinator's gRPC server, three agents that
dial out to it, a real audit log): secure aggregation at level 2 yields exactly the
weighted average of the scripted deltas, also when a boundary never submits or vanishes
after masking; the audit log holds both sides of every crossing; a window below m_min
aborts and loses no delta; the plain baseline is marked and exact; the sync controller
lengthens H while boundaries agree; delay-aware boundaries train while a window is in
flight; a buffered window does not wait and a late delta counts with its staleness, or is
dropped (and audited) beyond tau_max. Timing is gated on protocol events (the trainers'
gates, the coordinator's and agents' `wait`); stage and deadline timers are short."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from echelon.audit.record import PayloadType
from echelon.controller import SyncControllerConfig
from echelon.protocol.events import Train
from echelon.protocol.messages import ContributionSent, KeysAdvertised, ToCoordinator
from echelon.staleness import StalenessConfig, StalenessKind
from echelon_tools.audit import main as audit_cli
from services.boundary_agent.session import AgentSession
from tests.protocol.harness import DIM, TOKENS, TOL, ScriptedTrainer, expected_phi
from tests.services.sessions import ORGS, Sites, federation_config, start_sites

pytestmark = pytest.mark.timeout(60)

CONFIG = federation_config()
PAIR = replace(CONFIG, window=replace(CONFIG.window, min_cohort=2))
BUFFERED = replace(
    CONFIG, buffered=True, window=replace(CONFIG.window, buffer_k=2, deadline_s=3.0), windows=2
)


def committed(n: int) -> Callable[[Sites], bool]:
    return lambda sites: sum(o.committed for o in sites.coordinator.outcomes) >= n


def done(n: int) -> Callable[[Sites], bool]:
    return lambda sites: len(sites.coordinator.outcomes) >= n


def hold(rules: dict[str, tuple[Callable[[Train], bool], Callable[[Sites], bool]]]):  # type: ignore[no-untyped-def]
    """A gate: boundary -> (which training runs to hold, until what)."""

    def gate(sites: Sites, boundary: str, command: Train) -> None:
        rule = rules.get(boundary)
        if rule is not None and rule[0](command):
            assert sites.coordinator.wait(lambda: rule[1](sites), 45.0), "gate never opened"

    return gate


def first_run(command: Train) -> bool:
    return command.version == 0 and command.fresh


def second_run(command: Train) -> bool:
    """A buffered boundary's second run: from version 0 again, right after it submitted in
    window 1 (its first run started on version 0's arrival, before window 1 opened)."""
    return command.version == 0 and command.fresh and command.window == 1


def finish(sites: Sites, timeout_s: float = 30.0) -> None:
    """Runs to the last window, then waits until every live agent holds its version (so
    the last crossing is on the audit log on both sides)."""
    assert sites.run(timeout_s), "the coordinator did not get to its last window"
    version = sites.coordinator.core.version
    for b, agent in sites.agents.items():
        assert agent.wait(holds(agent, version), 10), f"{b} never got version {version}"


def holds(agent: AgentSession, version: int) -> Callable[[], bool]:
    return lambda: agent.core is not None and agent.core.held_version == version


def check_versions(sites: Sites) -> None:
    """Every committed version is the FedAvg step of its contributors' latest deltas."""
    previous = np.zeros(DIM, dtype=np.float32)
    config = sites.coordinator.core.config
    for commit in sites.commits:
        np.testing.assert_allclose(
            commit.phi, expected_phi(config, sites.trainers, commit, previous), atol=TOL
        )
        previous = commit.phi


def verify_audit_log(sites: Sites, tmp_path: Path) -> None:
    assert sites.audit is not None
    sites.audit.flush()
    report = tmp_path / "report.json"
    code = audit_cli(["verify", "--db", str(sites.audit.db), "--json", str(report)])
    assert code == 0, report.read_text()


# -- secure windows -------------------------------------------------------------------------------


def test_secure_window_yields_the_weighted_average(tmp_path: Path) -> None:
    sites = start_sites(CONFIG, ORGS, audit=tmp_path)
    try:
        finish(sites)
        (outcome,) = sites.coordinator.outcomes
        assert outcome.committed and outcome.contributors == ORGS, outcome
        assert not outcome.failed
        check_versions(sites)
        phi = sites.commits[0].phi
        for agent in sites.agents.values():
            assert agent.core is not None and agent.core.held_version == 1
            np.testing.assert_array_equal(agent.core.phi, phi)
    finally:
        sites.close()


def test_audit_log_holds_both_sides_of_every_crossing(tmp_path: Path) -> None:
    sites = start_sites(replace(CONFIG, windows=2), ORGS, audit=tmp_path)
    try:
        finish(sites)
        records = sites.records()
        types = {r.payload_type for r in records}
        assert {
            PayloadType.RUN_CONFIG,
            PayloadType.WINDOW_OPEN,
            PayloadType.KEY_ADVERTISEMENT,
            PayloadType.ENCRYPTED_SHARES,
            PayloadType.MASKED_DELTA,
            PayloadType.WINDOW_METADATA,
            PayloadType.SURVIVOR_LIST,
            PayloadType.SURVIVOR_SIGNATURE,
            PayloadType.UNMASKING_SHARES,
            PayloadType.GLOBAL_ADAPTER,
        } <= types
        assert PayloadType.PLAIN_DELTA not in types
        assert all(r.levels.level2 for r in records)
        # Each masked delta is on the log twice: sent by its boundary, received by the
        # coordinator (the verifier reconciles every such pair).
        # (A window that a slow machine aborts is retried under the next id: its crossings
        # are on the log too, so pairs are checked per window that happened.)
        masked = [r for r in records if r.payload_type == PayloadType.MASKED_DELTA]
        sides: dict[tuple[str, int], list[str]] = {}
        for r in masked:
            sides.setdefault((r.sender, r.window), []).append(r.direction.value)
        assert all(sorted(d) == ["received", "sent"] for d in sides.values()), sides
        for b in ORGS:
            assert len([w for (s, w) in sides if s == b]) >= 2, sides
        verify_audit_log(sites, tmp_path)
    finally:
        sites.close()


def test_boundary_that_never_submits_is_dropped_and_masks_cancel(tmp_path: Path) -> None:
    # org-c takes part in the key rounds, then trains until the window's version reached it.
    def gate(sites: Sites, boundary: str, command: Train) -> None:
        if boundary == "org-c" and first_run(command):
            c = sites.agents["org-c"]
            assert c.wait(lambda: c.core is not None and c.core.held_version == 1, 45)

    sites = start_sites(CONFIG, ORGS, gate=gate, audit=tmp_path)
    try:
        finish(sites)
        (outcome,) = sites.coordinator.outcomes
        assert outcome.committed and outcome.contributors == ("org-a", "org-b"), outcome
        assert "org-c" in dict(outcome.failed), outcome.failed
        # org-c's pairwise masks were in the others' vectors; its shares cancelled them.
        check_versions(sites)
        records = sites.records()
        unmasked = [r for r in records if r.payload_type == PayloadType.UNMASKING_SHARES]
        assert {r.sender for r in unmasked} >= {"org-a", "org-b"}
        # Ready after window 1 is over, org-c's delta waits inside org-c for a later window.
        masked = [r for r in records if r.payload_type == PayloadType.MASKED_DELTA]
        assert "org-c" not in {r.sender for r in masked}
        c = sites.agents["org-c"]
        assert c.wait(lambda: c.status().pending == 1, 10)
        assert c.log.sessions == 1
        verify_audit_log(sites, tmp_path)
    finally:
        sites.close()


def test_boundary_that_vanishes_after_masking_is_still_counted() -> None:
    # org-c's host goes away once its masked vector is in: it answers nothing after its
    # contribution, and its session ends when the survivor list asks for its signature.
    gone = threading.Event()

    def fault(boundary: str, message: ToCoordinator) -> ToCoordinator | None:
        if boundary != "org-c" or isinstance(message, ContributionSent):
            return message
        if message.window == 1 and gone.is_set():
            return None
        if type(message).__name__ == "SurvivorsSigned":
            gone.set()
            return None
        return message

    sites = start_sites(CONFIG, ORGS, fault=fault)
    try:
        assert gone.wait(30), "org-c was never asked to sign the survivor list"
        sites.agents["org-c"].stop()
        c = sites.coordinator
        assert c.wait(lambda: bool(c.outcomes), 30)
        (outcome,) = c.outcomes
        # Its masked input is in the sum; the survivors revealed its self-mask seed.
        assert outcome.committed and outcome.contributors == ORGS, outcome
        assert "org-c" in dict(outcome.failed), outcome.failed
        check_versions(sites)
    finally:
        sites.close()


def test_window_below_m_min_aborts_and_deltas_roll_over() -> None:
    # Two boundaries, m_min 2: org-b trains past window 1's deadline, so window 1 has one
    # contribution and aborts; org-a's delta waits inside org-a for window 2.
    at_window_2: dict[str, int] = {}

    def fault(boundary: str, message: ToCoordinator) -> ToCoordinator | None:
        if boundary == "org-a" and isinstance(message, KeysAdvertised) and message.window == 2:
            status = sites.agents["org-a"].status()  # window 2 just opened at org-a
            at_window_2.update(pending=status.pending, base=status.pending_base, lost=status.lost)
        return message

    sites = start_sites(
        PAIR, ("org-a", "org-b"), gate=hold({"org-b": (first_run, done(1))}), fault=fault
    )
    try:
        finish(sites)
        first, second = sites.coordinator.outcomes
        assert not first.committed and "m_min" in first.reason, first
        assert first.version == 0
        assert at_window_2 == {"pending": 1, "base": 0, "lost": 0}  # kept, not lost
        assert second.committed and second.contributors == ("org-a", "org-b"), second
        check_versions(sites)
        # org-a contributed its rolled-over delta; it did not train again on version 0.
        produced = sites.trainers["org-a"].produced
        assert [d.base_version for d in produced if d.base_version == 0] == [0]
    finally:
        sites.close()


def test_plain_baseline_is_marked_and_exact(tmp_path: Path) -> None:
    sites = start_sites(replace(CONFIG, level2=False), ORGS, audit=tmp_path)
    try:
        finish(sites)
        (outcome,) = sites.coordinator.outcomes
        assert outcome.committed and outcome.contributors == ORGS, outcome
        previous = np.zeros(DIM, dtype=np.float32)
        want = expected_phi(CONFIG, sites.trainers, sites.commits[0], previous)
        np.testing.assert_allclose(sites.commits[0].phi, want, atol=1e-6)
        records = sites.records()
        types = {r.payload_type for r in records}
        assert PayloadType.PLAIN_DELTA in types and PayloadType.MASKED_DELTA not in types
        assert all(not r.levels.level2 for r in records)
        verify_audit_log(sites, tmp_path)
    finally:
        sites.close()


# -- the sync controller --------------------------------------------------------------------------


@dataclass
class AgreeingTrainer(ScriptedTrainer):
    """Deltas that point the same way at every boundary and in every window."""

    def train(self, command: Train, now: float):  # type: ignore[no-untyped-def]
        result, seconds = super().train(command, now)
        rng = np.random.default_rng(sum(map(ord, self.boundary)))
        common = np.random.default_rng(0).normal(0.0, 0.01, DIM)
        delta = (common + rng.normal(0.0, 0.002, DIM)).astype(np.float32)
        result = replace(result, delta=delta)
        self.produced[-1] = result
        return result, seconds


def test_sync_controller_lengthens_h_while_boundaries_agree() -> None:
    controller = SyncControllerConfig(h_min=2, h_max=16, agreement_high=0.5, patience=1)
    config = replace(
        CONFIG,
        controller=controller,
        window=replace(CONFIG.window, inner_steps=2),
        windows=3,
    )
    sites = start_sites(config, ORGS, trainer=AgreeingTrainer)
    try:
        finish(sites)
        outcomes = sites.coordinator.outcomes
        assert all(o.committed for o in outcomes), outcomes
        assert [o.decision for o in outcomes] == ["agreement"] * 3, outcomes
        # Calm windows (agreement ~1, cosine ~1): H grows by 1.5x from the configured 2
        # (rounded), and each window's deltas are trained with that window's H.
        assert [o.inner_steps for o in outcomes] == [2, 3, 4]
        steps = [d.tokens // TOKENS for d in sites.trainers["org-a"].produced][:3]
        assert steps == [2, 3, 4], steps
        assert sites.coordinator.core.inner_steps == 6
        check_versions(sites)
    finally:
        sites.close()


# -- Echelon-DA -----------------------------------------------------------------------------------


def test_delay_aware_boundaries_train_while_the_window_is_in_flight() -> None:
    config = replace(CONFIG, delay_aware=True, windows=2)
    overlap: dict[str, int] = {}

    def gate(sites: Sites, boundary: str, command: Train) -> None:
        if not command.fresh and command.version == 0:
            overlap[boundary] = len(sites.coordinator.outcomes)  # windows done by then

    sites = start_sites(config, ORGS, gate=gate)
    try:
        finish(sites)
        first, second = sites.coordinator.outcomes
        assert first.committed and second.committed
        # Each boundary kept training from what it had submitted while window 1 was open.
        assert overlap == {b: 0 for b in ORGS}
        # That progress was re-based onto version 1 and contributed to window 2 at once,
        # at staleness 0: carry * (overlap - submitted) on base version 1.
        assert second.contributors == ORGS and second.signals["staleness_max"] == 0.0
        phi1 = sites.commits[0].phi
        for b in ORGS:
            (rebase,) = [r for r in sites.trainers[b].rebases if r.version == 1]
            np.testing.assert_array_equal(rebase.phi, phi1)
        rebased = {}
        for b in ORGS:
            produced = sites.trainers[b].produced
            submitted = next(d for d in produced if d.base_version == 0)
            overlapped = produced[1]
            assert overlapped.base_version == 0 and overlapped is not submitted
            rebased[b] = (overlapped.delta - submitted.delta).astype(np.float64)
            assert overlapped.tokens == TOKENS
        want = phi1 - sum(rebased.values()) / len(ORGS)  # equal tokens, staleness 0
        np.testing.assert_allclose(sites.commits[1].phi, want, atol=TOL)
    finally:
        sites.close()


# -- FedBuff ---------------------------------------------------------------------------------------


def test_buffered_window_does_not_wait_and_the_late_delta_counts_with_its_staleness() -> None:
    # org-c is late for window 1; in window 2, org-b is the one still training.
    gate = hold(
        {
            "org-c": (first_run, committed(1)),
            "org-b": (second_run, committed(2)),
        }
    )
    bases: dict[tuple[str, int], int] = {}

    def fault(boundary: str, message: ToCoordinator) -> ToCoordinator | None:
        if isinstance(message, ContributionSent):
            bases[(boundary, message.window)] = message.base_version
        return message

    sites = start_sites(BUFFERED, ORGS, gate=gate, fault=fault)
    try:
        finish(sites)
        first, second = sites.coordinator.outcomes
        assert first.committed and first.contributors == ("org-a", "org-b"), first  # K = 2
        assert second.committed and second.contributors == ("org-a", "org-c"), second
        # org-c's version-0 delta is one version late in window 2 (so is org-a's, trained
        # again from version 0 as soon as it had submitted): weight tokens/unit * 2**-0.5.
        assert bases[("org-c", 2)] == 0 and bases[("org-a", 2)] == 0
        assert second.signals["staleness_max"] == 1.0
        s = 2**-0.5
        np.testing.assert_allclose(sites.commits[1].aggregate[-1], 2 * s, atol=1e-3)
        weights = {b: TOKENS / BUFFERED.token_unit * s for b in second.contributors}
        g2 = sum(
            w * sites.trainers[b].produced[0].delta.astype(np.float64) for b, w in weights.items()
        ) / sum(weights.values())
        np.testing.assert_allclose(sites.commits[1].phi, sites.commits[0].phi - g2, atol=TOL)
    finally:
        sites.close()


def test_a_delta_beyond_tau_max_is_dropped_and_audited(tmp_path: Path) -> None:
    # org-c (tau_max 0) is late for window 1; in window 2 its version-0 delta is one
    # version stale: org-c drops it (and says so on the audit log) instead of sending it.
    # Its next run, from version 1, waits until window 2 is over.
    strict = replace(
        BUFFERED, staleness=StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=0)
    )

    def gate_c(sites: Sites, boundary: str, command: Train) -> None:
        if boundary == "org-c" and command.fresh:
            until = committed(1) if command.version == 0 else committed(2)
            assert sites.coordinator.wait(lambda: until(sites), 45.0), "gate never opened"

    sites = start_sites(BUFFERED, ORGS, gate=gate_c, audit=tmp_path, configs={"org-c": strict})
    late = sites.agents["org-c"]
    try:
        finish(sites)
        first, second = sites.coordinator.outcomes
        assert first.contributors == ("org-a", "org-b"), first
        assert second.committed and second.contributors == ("org-a", "org-b"), second
        assert late.wait(lambda: any(n.kind == "dropped" for n in late.log.notes), 10)
        (note,) = [n for n in late.log.notes if n.kind == "dropped"]
        assert (note.window, note.staleness) == (2, 1)
        dropped = [r for r in sites.records() if r.payload_type == PayloadType.CONTRIBUTION_DROPPED]
        assert [(r.sender, r.window, r.attributes.staleness) for r in dropped] == [  # type: ignore[union-attr]
            ("org-c", 2, 1)
        ]
        status = late.status()
        assert status.dropped == 1 and status.lost == 0
        # Nothing of it crossed: org-c sent no contribution after window 1's deadline.
        masked = [r for r in sites.records() if r.payload_type == PayloadType.MASKED_DELTA]
        assert not [r for r in masked if r.sender == "org-c"]
        verify_audit_log(sites, tmp_path)
    finally:
        sites.close()
