"""The boundary agent's window protocol core (sans-IO): which version it holds, which
deltas wait to be contributed, its side of the secure-aggregation rounds, the export
policy, staleness weights, Echelon-DA's overlap and re-base, and FedBuff's restart.

A delta waits inside the boundary until a version that lists this boundary as a
contributor consumes it; an aborted or missed window loses nothing, unless the delta was
already spent (a survivor list named it, so other survivors' shares can unmask it: the
core says so with `DeltaSpent` before its signature and shares
do, and it is never sent again). `BoundaryCore.handle(event, now)` returns commands;
`state()` is what the agent persists, and a core built from it resumes after a restart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.controller import relative_drift
from echelon.floor import LocalFloor, window_shortfalls
from echelon.policy import ExportRefused, apply_export_policy
from echelon.protocol.config import ProtocolConfig
from echelon.protocol.events import (
    COORDINATOR,
    Command,
    DeltaSpent,
    Event,
    Note,
    Rebase,
    Received,
    Send,
    Train,
    TrainedDelta,
    TrainingFailed,
    TrainingFinished,
)
from echelon.protocol.messages import (
    Declined,
    GlobalVersion,
    Joined,
    KeySetup,
    KeysRelayed,
    OpenWindow,
    SharesRelayed,
    SurvivorsAnnounced,
    UnmaskRequested,
    WindowAborted,
)
from echelon.protocol.rounds import PartyRefused, PartyRounds
from echelon.protocol.stats import BoundaryStats, contribution_vector
from echelon.secagg import SecAggError
from echelon.staleness import contribution_weight

log = structlog.get_logger(__name__)


@dataclass
class _Submitted:
    """A delta sent in `window`, whose fate (in a version or not) is not known yet."""

    window: int
    delta: TrainedDelta  # as trained (unclipped), for the delay-aware re-base
    spent: bool = False


@dataclass
class _Overlap:
    """Delay-aware training that continues after a submission."""

    submitted: _Submitted
    included_in: int | None = None  # the version whose contributors named this boundary
    excluded: bool = False
    result: TrainedDelta | None = None
    phi: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class BoundaryState:
    """What a boundary agent persists to resume after a restart: the version it holds, the
    deltas that wait inside it, and its counters. A delta that was in flight (submitted,
    fate unknown) is not resumed: it may have been unmasked, so it is counted lost."""

    held_version: int = -1
    phi: np.ndarray | None = None
    pending: tuple[TrainedDelta, ...] = ()
    last_window: int = 0
    lost: int = 0
    dropped: int = 0


class BoundaryCore:
    """One organization's side of the window protocol."""

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        boundary: str,
        theta0: np.ndarray,
        identity: Ed25519PrivateKey | None,
        identities: dict[str, Ed25519PublicKey],
        rounding_seed: int = 0,
        state: BoundaryState | None = None,
        floor: LocalFloor | None = None,
    ) -> None:
        """`theta0` is the shared initial adapter (the base of relative drift);
        `rounding_seed` seeds stochastic rounding per (run, window, party); `floor` is the
        organization's own minimum for a window (its cohort and H), refused below it."""
        self.config = config
        self.floor = floor
        self.boundary = boundary
        self.theta0 = theta0.astype(np.float32)
        self.dim = int(theta0.size)
        self.identity = identity
        self.identities = dict(identities)
        self.rounding_seed = rounding_seed
        self.held_version = -1
        self.phi = np.zeros(self.dim, dtype=np.float32)
        self.window: OpenWindow | None = None
        self.rounds: PartyRounds | None = None
        self.next_rounds: PartyRounds | None = None  # pre-keyed window, not open yet
        self._next_cohort: tuple[str, ...] = ()
        self.pending: deque[TrainedDelta] = deque()
        self.submitted: _Submitted | None = None
        self.overlap: _Overlap | None = None
        self.training = False
        self.inner_steps = config.window.inner_steps
        self.mu = config.mu
        self.last_window = 0
        self.lost = 0  # spent deltas whose window then failed
        self.dropped = 0  # deltas too stale or refused by the export policy
        if state is not None:
            self._resume(state)

    def _resume(self, state: BoundaryState) -> None:
        self.held_version = state.held_version
        if state.phi is not None:
            if state.phi.shape != (self.dim,):
                raise ValueError(f"BoundaryState.phi: length {state.phi.size}, want {self.dim}")
            self.phi = state.phi.astype(np.float32)
        self.pending = deque(state.pending)
        self.last_window = state.last_window
        self.lost, self.dropped = state.lost, state.dropped

    def state(self) -> BoundaryState:
        """The state to persist (see `BoundaryState`); an in-flight delta counts as lost."""
        lap = self.overlap
        in_flight = self.submitted is not None or (
            lap is not None and lap.included_in is None and not lap.excluded
        )
        pending = tuple(self.pending)
        return BoundaryState(
            held_version=self.held_version,
            phi=self.phi.copy(),
            pending=pending,
            last_window=self.last_window,
            lost=self.lost + int(in_flight),
            dropped=self.dropped,
        )

    # -- the one entry point -----------------------------------------------------------------
    def start(self, now: float) -> list[Command]:
        """The devices are ready: join (and say which version this boundary holds)."""
        return [Send(COORDINATOR, Joined(window=self.last_window, held_version=self.held_version))]

    def handle(self, event: Event, now: float) -> list[Command]:
        out: list[Command] = []
        if isinstance(event, Received):
            if event.sender == COORDINATOR:
                self._received(event.message, out)
        elif isinstance(event, TrainingFinished):
            self._trained(event.result, out)
        elif isinstance(event, TrainingFailed):
            self.training = False
            log.warning("training_failed", reason=event.reason)
            self._maybe_train(out)
        return out

    def _note(self, kind: str, window: int, reason: str, staleness: int = -1) -> Note:
        return Note(
            kind=kind, window=window, party=self.boundary, reason=reason, staleness=staleness
        )

    # -- messages ----------------------------------------------------------------------------
    def _received(self, message: object, out: list[Command]) -> None:
        try:
            if isinstance(message, GlobalVersion):
                self._install(message, out)
            elif isinstance(message, OpenWindow):
                self._open(message, out)
            elif isinstance(message, KeySetup):
                self._key_setup(message, out)
            elif isinstance(message, WindowAborted):
                self._aborted(message, out)
            elif isinstance(message, KeysRelayed):
                out.append(Send(COORDINATOR, self._rounds(message.window).on_keys(message)))
            elif isinstance(message, SharesRelayed):
                self._rounds(message.window).on_shares(message)
                self._submit(out)
            elif isinstance(message, SurvivorsAnnounced):
                self._survivors(message, out)
            elif isinstance(message, UnmaskRequested):
                self._unmask(message, out)
        except (PartyRefused, SecAggError, ValueError) as exc:
            window = getattr(message, "window", self.last_window)
            reason = f"{type(message).__name__} refused: {type(exc).__name__}: {exc}"
            log.warning("message_refused", window=window, reason=reason)
            out.append(self._note("refused", window, reason))
            out.append(Send(COORDINATOR, Declined(window=window, reason=reason)))

    def _rounds(self, window: int) -> PartyRounds:
        nxt = self.next_rounds
        if nxt is not None and nxt.window == window:
            return nxt
        if self.rounds is None or self.window is None or self.window.window != window:
            open_ = None if self.window is None else self.window.window
            raise PartyRefused(f"window {window} is not the open window ({open_})")
        return self.rounds

    def _install(self, message: GlobalVersion, out: list[Command]) -> None:
        if message.phi.shape != (self.dim,):
            raise ValueError(f"global adapter length {message.phi.size}, want {self.dim}")
        if message.version < self.held_version:
            raise PartyRefused(f"version {message.version} < held {self.held_version}")
        if self.window is not None and message.window >= self.window.window:
            self.rounds = None  # that window is over: nothing more goes to it
        if message.version == self.held_version:
            return
        self.held_version = message.version
        self.phi = message.phi.astype(np.float32)
        sub = self.submitted
        if sub is not None and message.window >= sub.window:
            included = self.boundary in message.contributors
            self._settle_submitted(included, message.version, out)
        self._maybe_train(out)

    def _settle_submitted(self, included: bool, version: int, out: list[Command]) -> None:
        """The submitted delta's fate is known: in `version`, or not."""
        sub = self.submitted
        assert sub is not None
        self.submitted = None
        lap = self.overlap
        if included:
            log.info("delta_consumed", version=version, base=sub.delta.base_version)
        elif sub.spent:
            self.lost += 1
            reason = "spent (unmasking shares released) but not in the version"
            out.append(self._note("delta_lost", sub.window, reason))
        elif lap is None:
            self.pending.appendleft(sub.delta)  # rolls over with its staleness
        if lap is not None:
            if included:
                lap.included_in, lap.phi = version, self.phi
            else:
                lap.excluded = True
            self._settle_overlap(out)

    def _settle_overlap(self, out: list[Command]) -> None:
        lap = self.overlap
        if lap is None or lap.result is None or (lap.included_in is None and not lap.excluded):
            return
        self.overlap = None
        result, sub = lap.result, lap.submitted.delta
        if lap.included_in is not None and lap.phi is not None:
            carry = self.config.rebase_carry
            # Devices moved from theta_v - sub to theta_v - result; re-based on v+1, the
            # delta against v+1 is carry * (result - sub) (docs/protocol.md).
            rebased = (np.float32(carry) * (result.delta - sub.delta)).astype(np.float32)
            out.append(Rebase(version=lap.included_in, phi=lap.phi, carry=carry))
            self.pending.append(replace(result, delta=rebased, base_version=lap.included_in))
            log.info("overlap_rebased", version=lap.included_in, tokens=result.tokens)
        elif lap.submitted.spent:
            # The submitted part is gone; what is left is the overlap's own progress, which
            # the devices hold on top of theta_v - sub: rebase it onto the held version.
            out.append(Rebase(version=self.held_version, phi=self.phi, carry=1.0))
            own = (result.delta - sub.delta).astype(np.float32)
            self.pending.append(replace(result, delta=own, base_version=self.held_version))
        else:
            merged = replace(
                result,
                tokens=result.tokens + sub.tokens,
                devices=min(result.devices, sub.devices),
                train_loss=(result.train_loss * result.tokens + sub.train_loss * sub.tokens)
                / max(1, result.tokens + sub.tokens),
            )
            self.pending.append(merged)  # one delta on base v: theta_v - theta_local
            log.info("overlap_merged", base=result.base_version)
        self._submit(out)
        self._maybe_train(out)

    def _party_rounds(self, window: int, cohort: tuple[str, ...]) -> PartyRounds:
        if window <= self.last_window:
            raise PartyRefused(f"window {window}, want > {self.last_window}")
        if self.boundary not in cohort:
            raise PartyRefused(f"window {window}: not in the cohort {cohort}")
        cfg = self.config
        identities = {i: self.identities[b] for i, b in enumerate(cohort) if b in self.identities}
        return PartyRounds(
            party=cohort.index(self.boundary),
            window=window,
            cohort=range(len(cohort)),
            config=cfg.secagg,
            secure=cfg.level2,
            identity=self.identity,
            identities=identities,
            graph_seed=cfg.graph_seed(window),
        )

    def _check_floor(self, cohort: tuple[str, ...], inner_steps: int | None) -> None:
        if self.floor is None:
            return
        short = window_shortfalls(cohort, inner_steps, self.floor, own=self.boundary)
        if short:
            raise PartyRefused("below this organization's floor: " + "; ".join(short))

    def _key_setup(self, message: KeySetup, out: list[Command]) -> None:
        self._check_floor(message.cohort, None)
        rounds = self._party_rounds(message.window, message.cohort)
        self.next_rounds = rounds
        self._next_cohort = message.cohort
        ad = rounds.advertise()
        if ad is not None:
            out.append(Send(COORDINATOR, ad))

    def _open(self, message: OpenWindow, out: list[Command]) -> None:
        self._check_floor(message.cohort, message.inner_steps)
        nxt = self.next_rounds
        pre_keyed = (
            nxt is not None and nxt.window == message.window and self._next_cohort == message.cohort
        )
        rounds = nxt if pre_keyed and nxt is not None else None
        if rounds is None:
            rounds = self._party_rounds(message.window, message.cohort)
        self.next_rounds = None
        if self.submitted is not None and self.submitted.window < message.window:
            # The submitted delta's window ended without a version naming it.
            self._settle_submitted(False, self.held_version, out)
        self.last_window = message.window
        self.window = message
        self.inner_steps, self.mu = message.inner_steps, message.mu
        self.rounds = rounds
        if not pre_keyed:
            ad = rounds.advertise()
            if ad is not None:
                out.append(Send(COORDINATOR, ad))
        self._maybe_train(out)
        self._submit(out)

    def _aborted(self, message: WindowAborted, out: list[Command]) -> None:
        if self.window is not None and self.window.window == message.window:
            self.rounds = None
        if self.submitted is not None and self.submitted.window == message.window:
            self._settle_submitted(False, self.held_version, out)
        self._maybe_train(out)

    def _survivors(self, message: SurvivorsAnnounced, out: list[Command]) -> None:
        """A survivor list that names this boundary: its masked vector is in a fixed sum that
        the other survivors' shares can unmask from now on, so the delta is spent before the
        signature (and later the shares) leave, and is never sent again."""
        rounds = self._rounds(message.window)
        signature = rounds.on_survivors(message)  # raises before anything is released
        sub = self.submitted
        if sub is not None and sub.window == message.window and rounds.party in message.survivors:
            sub.spent = True
            out.append(DeltaSpent(window=sub.window, base_version=sub.delta.base_version))
        out.append(Send(COORDINATOR, signature))

    def _unmask(self, message: UnmaskRequested, out: list[Command]) -> None:
        rounds = self._rounds(message.window)
        out.append(Send(COORDINATOR, rounds.on_unmask(message)))

    # -- training and submission -------------------------------------------------------------
    def _trained(self, result: TrainedDelta, out: list[Command]) -> None:
        self.training = False
        if self.overlap is not None and self.overlap.result is None:
            self.overlap.result = result
            self._settle_overlap(out)
            return
        self.pending.append(result)
        self._submit(out)
        self._maybe_train(out)

    def _maybe_train(self, out: list[Command]) -> None:
        """Idle devices train from the held version unless a delta waits or is in flight."""
        busy = self.training or self.overlap is not None
        waiting = self.pending or (self.submitted is not None and not self.config.buffered)
        if busy or waiting or self.held_version < 0 or self.run_over(self.held_version):
            return
        win = self.window
        if self.config.controller is not None and (win is None or win.version < self.held_version):
            return  # the window that opens on this version says its H and mu: train with them
        self.training = True
        out.append(
            Train(
                window=self.last_window,
                version=self.held_version,
                phi=self.phi,
                steps=self.inner_steps,
                mu=self.mu,
                fresh=True,
            )
        )

    def _submit(self, out: list[Command]) -> None:
        """Contributes the oldest waiting delta to the open window, once the keys are ready."""
        win, rounds = self.window, self.rounds
        if win is None or rounds is None or rounds.contributed or not rounds.keys_ready:
            return
        if self.submitted is not None or (self.overlap is not None and self.overlap.result):
            return
        cfg = self.config
        while self.pending:
            trained = self.pending.popleft()
            tau = win.version - trained.base_version
            weight = contribution_weight(trained.tokens, max(tau, 0), cfg.staleness, cfg.token_unit)
            if weight is None or tau < 0:
                self.dropped += 1
                reason = f"staleness {tau} > tau_max {cfg.staleness.tau_max}: delta dropped"
                out.append(self._note("dropped", win.window, reason, staleness=tau))
                continue
            try:
                decision = apply_export_policy(
                    trained.delta, devices=trained.devices, dim=self.dim, policy=cfg.policy
                )
            except ExportRefused as exc:
                self.dropped += 1
                reason = f"export policy refused: {exc}"
                out.append(self._note("refused", win.window, reason))
                out.append(Send(COORDINATOR, Declined(window=win.window, reason=reason)))
                self.rounds = None
                self._maybe_train(out)
                return
            stats = BoundaryStats(
                drift=relative_drift(decision.delta, self.theta0 + self.phi),
                train_loss=trained.train_loss,
                delta_norm=float(np.linalg.norm(decision.delta.astype(np.float64))),
                tokens=trained.tokens,
            )
            x = contribution_vector(decision.delta, stats, cfg.stats, cfg.secagg.clip)
            rng = np.random.default_rng([self.rounding_seed, win.window, rounds.party])
            sent = rounds.contribute(
                x,
                min(weight, cfg.secagg.max_weight),
                rng,
                base_version=trained.base_version,
                devices=trained.devices,
            )
            out.append(Send(COORDINATOR, sent))
            self.submitted = _Submitted(window=win.window, delta=trained)
            self._after_submit(win, out)
            return

    def run_over(self, version: int) -> bool:
        """Whether global `version` is the run's last (the declared length): a boundary
        that holds it trains no further, and its devices are free for the final
        evaluation."""
        return bool(self.config.windows) and version >= self.config.windows

    def _after_submit(self, win: OpenWindow, out: list[Command]) -> None:
        cfg = self.config
        # No overlap for a window that may commit the run's last version: nothing would use it.
        last = self.run_over(self.held_version + 1)
        if cfg.delay_aware and not self.training and self.submitted is not None and not last:
            self.overlap = _Overlap(submitted=self.submitted)
            self.training = True
            out.append(
                Train(
                    window=win.window,
                    version=self.submitted.delta.base_version,
                    phi=self.phi,
                    steps=self.inner_steps,
                    mu=self.mu,
                    fresh=False,
                )
            )
        elif cfg.buffered:
            self._maybe_train(out)
