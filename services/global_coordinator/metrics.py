"""Prometheus metrics of the global coordinator: cohort-level only (from masked sums),
never one boundary's statistic. Per boundary it counts participation alone (who
contributed to a window is coordination metadata that every cohort member learns)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from echelon.controller import ControlReason
from echelon.protocol.events import WindowOutcome
from echelon.protocol.rounds import RoundStage
from services.common.metrics import BYTES_IN as BYTES_IN
from services.common.metrics import BYTES_OUT as BYTES_OUT

WINDOW = Gauge("echelon_coordinator_window_id", "Last window that closed")
VERSION = Gauge("echelon_coordinator_global_version", "Latest global adapter version")
LAST_COMMIT = Gauge(
    "echelon_coordinator_last_commit_timestamp_seconds",
    "Unix time of the last committed global version (the coordinator's start until the "
    "first commit after it)",
)
LAST_COMMIT.set(time.time())
DECLARED_WINDOWS = Gauge(
    "echelon_coordinator_declared_windows",
    "Windows the run declares it will commit (0: until stopped); a run that reached them "
    "commits no more versions",
)
INNER_STEPS = Gauge("echelon_coordinator_inner_steps", "Inner steps H sent with the window")
OUTCOMES = ("committed", "aborted")
WINDOWS = Counter("echelon_coordinator_windows_total", "Windows by outcome", ["outcome"])
for _outcome in OUTCOMES:
    WINDOWS.labels(_outcome)
WINDOW_SECONDS = Histogram(
    "echelon_coordinator_window_seconds",
    "Duration of a window from open to distribution",
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
CONTRIBUTIONS = Gauge("echelon_coordinator_contributions", "Contributions in the last window")
COHORT = Gauge("echelon_coordinator_cohort_boundaries", "Boundaries in the last cohort")
DROPOUTS = Counter(
    "echelon_coordinator_dropouts_total",
    "Cohort members that failed or left a window before it closed",
)
BOUNDARY_CONTRIBUTIONS = Counter(
    "echelon_coordinator_boundary_contributions_total",
    "Windows a boundary's contribution was unmasked in (participation, not a statistic)",
    ["boundary"],
)
MISSED = Gauge(
    "echelon_coordinator_boundary_missed_windows",
    "Consecutive closed windows a registered boundary did not contribute to",
    ["boundary"],
)
STALENESS = Histogram(
    "echelon_coordinator_staleness_versions",
    "Largest staleness in a window's cohort (versions behind)",
    buckets=(0, 1, 2, 3, 5, 8),
)
MAX_STALENESS = Gauge(
    "echelon_coordinator_max_staleness_versions",
    "Largest staleness in the last committed window's cohort (versions behind)",
)
TRAIN_LOSS = Gauge(
    "echelon_coordinator_train_loss",
    "Cohort mean train loss of the last window (masked sums; nats per token)",
)
AGREEMENT = Gauge(
    "echelon_coordinator_agreement_ratio", "||sum w delta|| / sum w ||delta||, in [0, 1]"
)
H_DECISIONS = Counter(
    "echelon_coordinator_sync_decisions_total", "Sync-controller decisions by reason", ["reason"]
)
for _reason in ControlReason:
    H_DECISIONS.labels(_reason.value)
MU = Gauge("echelon_coordinator_proximal_mu", "Proximal coefficient mu sent with the window")
SESSIONS = Gauge("echelon_coordinator_sessions", "Agents with an open window session")
FRAMES_OUT = Counter(
    "echelon_coordinator_messages_sent_total", "Protocol messages sent to agents", ["kind"]
)
DRIFT_RMS = Gauge(
    "echelon_coordinator_drift_rms_ratio",
    "Cohort RMS of relative drift ||delta|| / ||theta|| (masked sums)",
)
STAGES = tuple(s.name.lower() for s in RoundStage if s not in (RoundStage.DONE, RoundStage.ABORTED))
SECAGG_STAGE_SECONDS = Histogram(
    "echelon_coordinator_secagg_stage_seconds",
    "Time a window's secure aggregation spent in each stage (keys, shares, collect, "
    "confirm, unmask); pre-keyed stages overlap the previous window",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
for _stage in STAGES:
    SECAGG_STAGE_SECONDS.labels(_stage)


class StageClock:
    """Times each window's secure-aggregation stages from where the core stands after each
    event; not thread-safe (the coordinator calls it under its lock)."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._since: dict[int, tuple[RoundStage, float]] = {}  # window -> (stage, entered)

    def seen(self, window: int, stage: RoundStage, now: float) -> None:
        """The window is at `stage` now: closes the stage it was in before, if another."""
        entered = self._since.get(window)
        if entered is not None and entered[0] is stage:
            return
        if entered is not None:
            self._observe(entered, now)
        self._since[window] = (stage, now)
        while len(self._since) > self._keep:
            del self._since[min(self._since)]

    def ended(self, window: int, now: float) -> None:
        """The window closed (committed or aborted): closes its last stage."""
        entered = self._since.pop(window, None)
        if entered is not None:
            self._observe(entered, now)

    @staticmethod
    def _observe(entered: tuple[RoundStage, float], now: float) -> None:
        stage, since = entered
        if stage not in (RoundStage.DONE, RoundStage.ABORTED):
            SECAGG_STAGE_SECONDS.labels(stage.name.lower()).observe(max(0.0, now - since))


def participation(outcome: WindowOutcome, registered: Iterable[str]) -> None:
    """Who contributed to a closed window, among the registered boundaries."""
    DROPOUTS.inc(len(outcome.failed))
    contributed = set(outcome.contributors)
    for boundary in contributed:
        BOUNDARY_CONTRIBUTIONS.labels(boundary).inc()
    for boundary in registered:
        if boundary in contributed:
            MISSED.labels(boundary).set(0)
        else:
            MISSED.labels(boundary).inc()


def committed(version: int, now: float) -> None:
    VERSION.set(version)
    LAST_COMMIT.set(now)
