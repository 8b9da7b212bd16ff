"""The boundary agent's domain state: the global version it holds, its pending delta, and
the window it takes part in. No gRPC here; the servicer turns requests into these calls.

Semi-asynchrony: a boundary trains H inner steps from the version it holds; the
resulting delta waits inside the boundary until a window collects it (with its
staleness) and the coordinator confirms, by delivering a version that lists this
boundary as a contributor, that it was aggregated. Until then it is never dropped,
so an aborted or missed window loses nothing and nothing is counted twice.

Delay-aware mode (Echelon-DA): once a delta has been collected, the boundary keeps
training from the point it submitted (theta_submitted = theta_v - delta) while the
window's communication is in flight. When version v+1 arrives, that progress is
re-based: if v+1 includes the submitted delta, the local model becomes
theta_(v+1) + (theta_local - theta_submitted), so the next contribution is the
overlap's own delta with base v+1; if not, the two deltas merge into one delta on
base v (theta_v - theta_local), which rolls over with its staleness.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import structlog

from echelon.policy import ExportPolicy, ExportRefused, apply_export_policy
from echelon.stages import StageObserver, ignore_stage
from echelon.staleness import StalenessConfig, contribution_weight

log = structlog.get_logger(__name__)


class RuntimeStage(StrEnum):
    """Stages a boundary reports to its `on_stage` observer (tests gate faults on them)."""

    DELTA_READY = "delta_ready"  # a trained delta is pending (or overlap progress is in)
    CONTRIBUTION_DROPPED = "contribution_dropped"  # too stale: dropped and audited


class WindowStateError(Exception):
    """A call that does not fit the agent's window state (FAILED_PRECONDITION)."""


@dataclass(frozen=True, kw_only=True)
class WindowSpec:
    """The coordinator's description of an open window, as the agent needs it."""

    window: int
    version: int
    parties: dict[str, int]  # boundary -> secure-aggregation party index
    deadline_unix_s: float
    inner_steps: int
    lr: float
    mu: float
    token_unit: float


@dataclass(frozen=True, kw_only=True)
class TrainedDelta:
    """A boundary delta (token-weighted average over devices) with its O(1) facts."""

    delta: np.ndarray  # theta_base - theta_boundary, float32
    base_version: int
    tokens: int
    devices: int
    train_loss: float
    val_loss: float
    drift: float


@dataclass(frozen=True, kw_only=True)
class Contribution:
    """What the boundary contributes to one window: its clipped delta, weight and metadata.

    The delta is weighted (and masked, with level 2 on) only as it is encoded for the wire.
    """

    window: int
    delta: np.ndarray  # float32, length d, clipped to the policy's norm
    weight: float
    staleness: int
    delta_norm: float
    source: TrainedDelta


# Runs H inner steps from a global adapter; returns the boundary delta. Supplied by the
# agent's main (a DevicePool) or by tests.
Trainer = Callable[[np.ndarray, int, WindowSpec], TrainedDelta]


@dataclass
class _Overlap:
    """Training that continues after a submission (delay-aware mode)."""

    submitted: TrainedDelta
    result: TrainedDelta | None = None
    included_in: int | None = None  # the version that included `submitted`
    excluded: bool = False  # a version arrived without it


def _merged(first: TrainedDelta, second: TrainedDelta) -> TrainedDelta:
    """Two successive deltas from the same base as one: theta_v - theta_local."""
    tokens = first.tokens + second.tokens
    loss = (first.train_loss * first.tokens + second.train_loss * second.tokens) / max(tokens, 1)
    return dataclasses.replace(
        first,
        delta=(first.delta + second.delta).astype(np.float32),
        tokens=tokens,
        devices=min(first.devices, second.devices),
        train_loss=loss,
        val_loss=second.val_loss,
        drift=first.drift + second.drift,
    )


@dataclass
class _State:
    held_version: int = -1
    phi: np.ndarray | None = None  # global adapter as an offset from the shared initial adapter
    window: WindowSpec | None = None
    pending: TrainedDelta | None = None
    collected_in: set[int] = field(default_factory=set)
    training: threading.Thread | None = None
    overlap: _Overlap | None = None
    delay_aware: bool = False
    tokens_total: int = 0
    last_val_loss: float = float("nan")


class BoundaryRuntime:
    """Thread-safe state of one boundary agent."""

    def __init__(
        self,
        *,
        boundary: str,
        theta0: np.ndarray,
        trainer: Trainer,
        policy: ExportPolicy,
        staleness: StalenessConfig,
        on_dropped: Callable[[int, int], None] = lambda window, staleness: None,
        on_stage: StageObserver = ignore_stage,
    ) -> None:
        self.boundary = boundary
        self.theta0 = theta0.astype(np.float32)
        self.dim = int(theta0.size)
        self._trainer = trainer
        self._policy = policy
        self._staleness = staleness
        self._on_dropped = on_dropped
        self._on_stage = on_stage
        self._state = _State()
        self._lock = threading.Condition()

    def set_run(
        self, staleness: StalenessConfig, policy: ExportPolicy, delay_aware: bool = False
    ) -> None:
        """Adopts the run's declared staleness function, export policy and DA mode."""
        with self._lock:
            self._staleness = staleness
            self._policy = policy
            self._state.delay_aware = delay_aware

    # -- global versions ---------------------------------------------------------------
    def install_global(self, version: int, phi: np.ndarray, contributors: list[str]) -> None:
        """Adopts global `version`; a pending delta that it includes is consumed."""
        if phi.shape != (self.dim,):
            raise ValueError(f"global adapter length: got {phi.size}, want {self.dim}")
        with self._lock:
            st = self._state
            if version == st.held_version and st.phi is not None and np.array_equal(st.phi, phi):
                return  # a re-delivery (e.g. after a coordinator restart) changes nothing
            if version <= st.held_version:
                raise WindowStateError(
                    f"global version: got {version}, want > held version {st.held_version}"
                )
            st.held_version = version
            st.phi = phi.astype(np.float32)
            submitted = bool(st.collected_in) and st.pending is not None
            if submitted and self.boundary in contributors:
                assert st.pending is not None
                log.info("delta_consumed", version=version, base=st.pending.base_version)
                st.pending = None
                if st.overlap is not None:
                    st.overlap.included_in = version
            elif submitted and st.overlap is not None:
                st.overlap.excluded = True
            st.collected_in.clear()
            self._settle_overlap()
            if st.window is not None and st.window.version == version:
                self._maybe_start_training(st.window)  # the window opened before its version came
            self._lock.notify_all()

    @property
    def held_version(self) -> int:
        with self._lock:
            return self._state.held_version

    def theta(self) -> np.ndarray:
        with self._lock:
            phi = self._state.phi
            return self.theta0 if phi is None else self.theta0 + phi

    # -- windows -----------------------------------------------------------------------
    def open_window(self, spec: WindowSpec) -> None:
        """Takes part in `spec`; starts training when idle with no delta waiting."""
        with self._lock:
            st = self._state
            if st.window is not None and spec.window <= st.window.window:
                raise WindowStateError(
                    f"OpenWindowRequest.ref.window: got {spec.window}, want > {st.window.window}"
                )
            st.window = spec
            self._maybe_start_training(spec)

    def _maybe_start_training(self, spec: WindowSpec) -> None:
        st = self._state
        busy = st.training is not None and st.training.is_alive()
        if busy or st.pending is not None or st.held_version != spec.version:
            return
        theta = self.theta0 if st.phi is None else self.theta0 + st.phi
        thread = threading.Thread(
            target=self._train, args=(theta, spec), name=f"train-w{spec.window}", daemon=True
        )
        st.training = thread
        thread.start()

    def _train(self, theta: np.ndarray, spec: WindowSpec, overlap: bool = False) -> None:
        started = time.monotonic()
        try:
            result = self._trainer(theta, spec.version, spec)
        except Exception:
            log.exception("training_failed", window=spec.window)
            with self._lock:
                self._state.overlap = None if overlap else self._state.overlap
            return
        with self._lock:
            st = self._state
            st.tokens_total += result.tokens
            st.last_val_loss = result.val_loss
            if overlap and st.overlap is not None:
                st.overlap.result = result
                self._settle_overlap()
            else:
                st.pending = result
            self._lock.notify_all()
        log.info(
            "delta_ready",
            window=spec.window,
            base=result.base_version,
            tokens=result.tokens,
            train_loss=round(result.train_loss, 4),
            val_loss=round(result.val_loss, 4),
            train_s=round(time.monotonic() - started, 3),
        )
        self._on_stage(RuntimeStage.DELTA_READY, spec.window)

    def _start_overlap(self, spec: WindowSpec, contribution: Contribution) -> None:
        """Delay-aware: keep training from theta_submitted while the window is in flight."""
        st = self._state
        busy = st.training is not None and st.training.is_alive()
        base = contribution.source.base_version
        if not st.delay_aware or busy or st.overlap is not None or base != st.held_version:
            return
        submitted = dataclasses.replace(contribution.source, delta=contribution.delta)
        st.pending = submitted  # what was sent (clipped) is what a version may include
        st.overlap = _Overlap(submitted=submitted)
        theta = self.theta0 + (st.phi if st.phi is not None else 0.0) - contribution.delta
        thread = threading.Thread(
            target=self._train,
            args=(theta.astype(np.float32), spec, True),
            name=f"overlap-w{spec.window}",
            daemon=True,
        )
        st.training = thread
        thread.start()

    def _settle_overlap(self) -> None:
        """Re-bases finished overlap progress once the submitted delta's fate is known."""
        st = self._state
        lap = st.overlap
        if lap is None or lap.result is None or (lap.included_in is None and not lap.excluded):
            return
        if lap.included_in is not None:
            st.pending = dataclasses.replace(lap.result, base_version=lap.included_in)
            log.info("overlap_rebased", version=lap.included_in, tokens=lap.result.tokens)
        else:
            st.pending = _merged(lap.submitted, lap.result)
            log.info("overlap_merged", base=lap.submitted.base_version)
        st.overlap = None
        self._lock.notify_all()

    def window(self, window: int) -> WindowSpec:
        """The open window; raises WindowStateError when `window` is not it."""
        with self._lock:
            spec = self._state.window
            if spec is None or spec.window != window:
                want = "none open" if spec is None else spec.window
                raise WindowStateError(f"ref.window: got {window}, want {want}")
            return spec

    def wait_contribution(self, window: int, now: Callable[[], float]) -> Contribution | None:
        """Blocks until a delta is ready or the window's deadline; None at the deadline.

        Raises WindowStateError when the window is not open or was already collected, and
        ExportRefused when the policy refuses the delta.
        """
        spec = self.window(window)
        with self._lock:
            st = self._state
            if window in st.collected_in:
                raise WindowStateError(f"window {window}: contribution already collected")
            while st.pending is None:
                remaining = spec.deadline_unix_s - now()
                if remaining <= 0:
                    return None
                self._lock.wait(timeout=min(remaining, 1.0))
            trained = st.pending
        contribution = self._contribution(spec, trained)
        with self._lock:
            st.collected_in.add(window)
            self._start_overlap(spec, contribution)
        return contribution

    def _contribution(self, spec: WindowSpec, trained: TrainedDelta) -> Contribution:
        """The policy-checked, weighted contribution. Raises ExportRefused when the policy
        refuses the delta or it is too stale (then it is dropped, and the drop audited)."""
        decision = apply_export_policy(
            trained.delta, devices=trained.devices, dim=self.dim, policy=self._policy
        )
        staleness = spec.version - trained.base_version
        weight = contribution_weight(trained.tokens, staleness, self._staleness, spec.token_unit)
        if weight is None:
            log.warning(
                "contribution_dropped",
                window=spec.window,
                staleness=staleness,
                tau_max=self._staleness.tau_max,
            )
            self._on_dropped(spec.window, staleness)
            self._on_stage(RuntimeStage.CONTRIBUTION_DROPPED, spec.window)
            with self._lock:
                self._state.pending = None
                self._state.overlap = None
            raise ExportRefused(
                f"staleness {staleness} > tau_max {self._staleness.tau_max}: delta dropped"
            )
        return Contribution(
            window=spec.window,
            delta=decision.delta,
            weight=weight,
            staleness=staleness,
            delta_norm=float(np.linalg.norm(decision.delta)),
            source=trained,
        )

    def abort_window(self, window: int) -> bool:
        """The window ended without a result: the delta stays for a later window."""
        with self._lock:
            self._state.collected_in.discard(window)
            return self._state.pending is not None

    def status(self) -> dict[str, float]:
        with self._lock:
            st = self._state
            return {
                "held_version": st.held_version,
                "window": -1 if st.window is None else st.window.window,
                "has_pending": float(st.pending is not None),
                "pending_base": -1 if st.pending is None else st.pending.base_version,
                "tokens_total": st.tokens_total,
                "val_loss": st.last_val_loss,
            }
