"""The coordinator's window protocol core (sans-IO): cohorts, the secure-aggregation rounds,
FedBuff/deadline closing, rollover and abort, the DiLoCo outer step, the drift-aware sync
controller and distribution of each new version.

`CoordinatorCore.handle(event, now)` returns the commands to execute, in order. Decisions
are the pure functions of `echelon.window` and `echelon.controller`; the core keeps the
state between them. A window's deadlines are timers; a party's silence, refusal or garbage
is that party's failure and the window goes on without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.aggregation import AggregationError, WindowSum
from echelon.controller import (
    ControllerState,
    SyncSignals,
    agreement_ratio,
    cosine,
    decide,
    initial_state,
)
from echelon.outer import OuterOptimizer
from echelon.protocol.config import ProtocolConfig
from echelon.protocol.events import (
    Command,
    CommitVersion,
    Event,
    PartyFailed,
    Received,
    Send,
    SetTimer,
    TimerFired,
    WindowOutcome,
)
from echelon.protocol.messages import (
    ContributionSent,
    Declined,
    GlobalVersion,
    Joined,
    KeySetup,
    OpenWindow,
    WindowAborted,
)
from echelon.protocol.rounds import AggregatorRounds, Outbound, PartyMessage, RoundStage
from echelon.protocol.stats import STATS, CohortStats, split_sum
from echelon.window import BoundarySeen, close_decision, select_cohort, unmask_decision

log = structlog.get_logger(__name__)

OPEN_TIMER = "open"


@dataclass
class Peer:
    """What the coordinator knows of a boundary: O(1), no statistic of its data."""

    held_version: int = -1
    last_seen: float = -math.inf
    live: bool = False


@dataclass(frozen=True, kw_only=True)
class CoordinatorState:
    """What a coordinator resumes from after a restart (its durable store holds it)."""

    window: int = 0
    version: int = 0
    phi: np.ndarray | None = None
    momentum: np.ndarray | None = None
    contributors: tuple[str, ...] = ()
    controller: ControllerState | None = None
    committed: int = 0


@dataclass
class _Window:
    id: int
    version: int
    opened: float
    cohort: tuple[str, ...]
    rounds: AggregatorRounds
    inner_steps: int
    base_versions: dict[str, int] = field(default_factory=dict)
    timed_stage: RoundStage | None = None  # the stage whose timeout is set


class CoordinatorCore:
    """The global plane's side of the window protocol."""

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        dim: int,
        identities: dict[str, Ed25519PublicKey],
        state: CoordinatorState | None = None,
    ) -> None:
        """`dim` is the adapter's length; `identities` the boundaries' identity keys (from
        the run's declaration), which also define who may join."""
        self.config = config
        self.dim = dim
        self.identities = dict(identities)
        st = state or CoordinatorState()
        self.window_id = st.window
        self.version = st.version
        self.phi = np.zeros(dim, dtype=np.float32) if st.phi is None else st.phi.astype(np.float32)
        self.contributors = st.contributors
        self.committed = st.committed
        self.optimizer = OuterOptimizer(config.outer, dim, st.momentum)
        ctl = config.controller
        self.controller: ControllerState | None = st.controller or (
            initial_state(config.window.inner_steps, config.mu, ctl) if ctl else None
        )
        self.inner_steps = (
            self.controller.inner_steps if self.controller else config.window.inner_steps
        )
        self.mu = self.controller.mu if self.controller else config.mu
        self.peers: dict[str, Peer] = {}
        self.current: _Window | None = None
        self.next: _Window | None = None  # pre-keyed: key rounds under way, not open yet
        self.previous_g: np.ndarray | None = None
        self.outcomes: list[WindowOutcome] = []

    # -- the one entry point -----------------------------------------------------------------
    def handle(self, event: Event, now: float) -> list[Command]:
        """Takes one event at time `now`; returns the commands to execute, in order."""
        out: list[Command] = []
        if isinstance(event, Received):
            self._received(event.sender, event, now, out)
        elif isinstance(event, PartyFailed):
            self._party_failed(event.party, event.reason, now, out)
        elif isinstance(event, TimerFired):
            self._timer(event.key, now, out)
        return out

    @property
    def done(self) -> bool:
        return bool(self.config.windows) and self.committed >= self.config.windows

    # -- events ------------------------------------------------------------------------------
    def _received(self, sender: str, event: Received, now: float, out: list[Command]) -> None:
        message = event.message
        if sender not in self.identities:
            log.warning("unknown_sender", sender=sender)
            return
        peer = self.peers.setdefault(sender, Peer())
        peer.last_seen = now
        if isinstance(message, Joined):
            peer.live = True
            peer.held_version = message.held_version
            if self.current is None:  # after every join of this instant (and the grace)
                out.append(SetTimer(OPEN_TIMER, now + self.config.join_grace_s))
            return
        nxt = self.next
        if nxt is not None and message.window == nxt.id and sender in nxt.cohort:
            if isinstance(message, PartyMessage):
                sends = nxt.rounds.receive(nxt.cohort.index(sender), message)
            else:
                sends = nxt.rounds.fail(nxt.cohort.index(sender), "declined the key set-up")
            self._route_next(nxt, sends, now, out)
            return
        win = self.current
        if win is None or message.window != win.id or sender not in win.cohort:
            log.info(
                "message_outside_window",
                sender=sender,
                kind=type(message).__name__,
                window=message.window,
                open=None if win is None else win.id,
            )
            return
        party = win.cohort.index(sender)
        if isinstance(message, Declined):
            self._route(win, win.rounds.fail(party, f"declined: {message.reason}"), now, out)
            return
        if isinstance(message, ContributionSent):
            tau = win.version - message.base_version
            tau_max = self.config.staleness.tau_max
            if not 0 <= tau <= tau_max or message.devices < self.config.policy.k_min:
                reason = (
                    f"base version {message.base_version} (staleness {tau}, want 0..{tau_max}),"
                    f" devices {message.devices} (want >= k_min {self.config.policy.k_min})"
                )
                self._route(win, win.rounds.fail(party, reason), now, out)
                return
            win.base_versions[sender] = message.base_version
        if isinstance(message, PartyMessage):
            self._route(win, win.rounds.receive(party, message), now, out)
        else:
            reason = f"a {type(message).__name__} is not a boundary's message"
            self._route(win, win.rounds.fail(party, reason), now, out)

    def _party_failed(self, party: str, reason: str, now: float, out: list[Command]) -> None:
        peer = self.peers.get(party)
        if peer is not None:
            peer.live = False
        win = self.current
        if win is not None and party in win.cohort:
            self._route(win, win.rounds.fail(win.cohort.index(party), reason), now, out)
        nxt = self.next
        if nxt is not None and party in nxt.cohort:
            self._route_next(nxt, nxt.rounds.fail(nxt.cohort.index(party), reason), now, out)

    def _timer(self, key: object, now: float, out: list[Command]) -> None:
        win = self.current
        if key == OPEN_TIMER:
            if win is None:
                self._try_open(now, out)
            return
        nxt = self.next
        if isinstance(key, tuple) and nxt is not None and key[1] == nxt.id:
            if key[0] == "stage" and nxt.rounds.stage.name == key[2]:
                self._route_next(nxt, nxt.rounds.expire(), now, out)
            return
        if not isinstance(key, tuple) or win is None or key[1] != win.id:
            return
        if key[0] == "deadline":
            self._check_close(win, now, out)
        elif key[0] == "stage" and win.rounds.stage.name == key[2]:
            self._route(win, win.rounds.expire(), now, out)

    # -- the window --------------------------------------------------------------------------
    def _try_open(self, now: float, out: list[Command]) -> None:
        if self.done:
            return
        cfg = self.config
        seen = [
            BoundarySeen(b, p.last_seen if p.live else -math.inf) for b, p in self.peers.items()
        ]
        decision = select_cohort(now, seen, cfg.window)
        if not decision.open_window:
            log.debug("no_cohort", reason=decision.reason)
            out.append(SetTimer(OPEN_TIMER, now + cfg.retry_s))
            return
        nxt, self.next = self.next, None
        if nxt is not None and all(self.peers[b].live for b in nxt.cohort):
            nxt.version, nxt.opened, nxt.inner_steps = self.version, now, self.inner_steps
            self.current = nxt
        else:
            self.current = self._new_window(decision.members, now)
        w, cohort = self.current.id, self.current.cohort
        opening = OpenWindow(
            window=w,
            version=self.version,
            cohort=cohort,
            deadline_s=now + cfg.window.deadline_s,
            inner_steps=self.inner_steps,
            mu=self.mu,
        )
        log.info("window_open", window=w, version=self.version, cohort=list(cohort))
        for b in cohort:
            if self.peers[b].held_version != self.version:
                out.append(Send(b, self._global(w)))
                self.peers[b].held_version = self.version
            out.append(Send(b, opening))
        out.append(SetTimer(("deadline", w), now + cfg.window.deadline_s))
        self._stage_timer(self.current, now, out)

    def _new_window(self, cohort: tuple[str, ...], now: float) -> _Window:
        cfg = self.config
        self.window_id += 1
        w = self.window_id
        rounds = AggregatorRounds(
            window=w,
            cohort=range(len(cohort)),
            length=self.dim + len(STATS),
            config=cfg.secagg if cfg.level2 else None,
            graph_seed=cfg.graph_seed(w),
            identities={i: self.identities[b] for i, b in enumerate(cohort)},
        )
        return _Window(w, self.version, now, cohort, rounds, self.inner_steps)

    def _prekey(self, now: float, out: list[Command]) -> None:
        """Starts the next window's key rounds while this one unmasks (its cohort: the live
        boundaries now; one that joins later waits a window)."""
        seen = [
            BoundarySeen(b, p.last_seen if p.live else -math.inf) for b, p in self.peers.items()
        ]
        decision = select_cohort(now, seen, self.config.window)
        last = bool(self.config.windows) and self.committed + 1 >= self.config.windows
        if not decision.open_window or last:
            return
        nxt = self._new_window(decision.members, now)
        self.next = nxt
        for b in nxt.cohort:
            out.append(Send(b, KeySetup(window=nxt.id, cohort=nxt.cohort)))
        self._stage_timer(nxt, now, out)

    def _route_next(
        self, nxt: _Window, sends: list[Outbound], now: float, out: list[Command]
    ) -> None:
        for o in sends:
            out.append(Send(nxt.cohort[o.party], o.message))
        if nxt.rounds.stage is RoundStage.ABORTED:
            log.info("prekey_aborted", window=nxt.id, reason=nxt.rounds.abort_reason)
            self.next = None
        elif self.next is nxt:
            self._stage_timer(nxt, now, out)

    def _global(self, window: int) -> GlobalVersion:
        return GlobalVersion(
            window=window, version=self.version, phi=self.phi, contributors=self.contributors
        )

    def _stage_timer(self, win: _Window, now: float, out: list[Command]) -> None:
        stage = win.rounds.stage
        if stage is win.timed_stage:
            return
        win.timed_stage = stage
        if stage in (RoundStage.KEYS, RoundStage.SHARES, RoundStage.CONFIRM, RoundStage.UNMASK):
            out.append(SetTimer(("stage", win.id, stage.name), now + self.config.round_timeout_s))

    def _route(self, win: _Window, sends: list[Outbound], now: float, out: list[Command]) -> None:
        """Sends the round's messages, then acts on where the round now stands."""
        for o in sends:
            out.append(Send(win.cohort[o.party], o.message))
        if self.current is not win:
            return
        stage = win.rounds.stage
        if stage is RoundStage.DONE:
            self._finish(win, now, out)
        elif stage is RoundStage.ABORTED:
            self._abort(win, win.rounds.abort_reason or "aborted", now, out)
        elif stage is RoundStage.COLLECT:
            self._check_close(win, now, out)
        else:
            self._stage_timer(win, now, out)

    def _check_close(self, win: _Window, now: float, out: list[Command]) -> None:
        rounds = win.rounds
        if self.current is not win or rounds.stage is not RoundStage.COLLECT:
            return
        failed = sum(1 for p in rounds.failed if p not in rounds.collected)
        decision = close_decision(
            now,
            opened_s=win.opened,
            cohort_size=len(win.cohort),
            collected=len(rounds.collected),
            failed=failed,
            config=self.config.window,
        )
        if not decision.close:
            return
        gate = unmask_decision(len(rounds.collected), self.config.window)
        log.info("window_closing", window=win.id, reason=decision.detail, unmask=gate.reason)
        rounds.expire()  # whoever has not contributed by now is out of this window
        if not gate.unmask:
            self._abort(win, gate.reason, now, out)
            return
        if self.config.prekey and self.next is None:
            self._prekey(now, out)
        self._route(win, rounds.close_collection(), now, out)

    def _abort(self, win: _Window, reason: str, now: float, out: list[Command]) -> None:
        self.current = None
        for b in win.cohort:
            if self.peers[b].live:
                out.append(Send(b, WindowAborted(window=win.id, reason=reason)))
        outcome = WindowOutcome(
            window=win.id,
            committed=False,
            reason=reason,
            version=self.version,
            failed=self._failures(win),
            inner_steps=win.inner_steps,
            opened_s=win.opened,
        )
        self.outcomes.append(outcome)
        out.append(outcome)
        log.info("window_aborted", window=win.id, reason=reason)
        out.append(SetTimer(OPEN_TIMER, now + self.config.retry_s))

    def _failures(self, win: _Window) -> tuple[tuple[str, str], ...]:
        return tuple((win.cohort[p], r) for p, r in sorted(win.rounds.failed.items()))

    def _finish(self, win: _Window, now: float, out: list[Command]) -> None:
        result = win.rounds.result
        assert result is not None
        cfg = self.config
        delta_sum, stats = split_sum(
            result.weighted_sum, result.weight_sum, cfg.stats, cfg.secagg.clip
        )
        total = WindowSum(delta_sum, result.weight_sum, result.contributors)
        try:
            g = total.pseudo_gradient()
        except AggregationError as exc:
            self._abort(win, f"unusable sum: {exc}", now, out)
            return
        names = tuple(sorted(win.cohort[p] for p in result.contributors))
        self.phi = self.optimizer.step(self.phi, g)
        self.version += 1
        self.committed += 1
        self.contributors = names
        self.current = None
        signals, decision = self._control(g, total, stats)
        out.append(
            CommitVersion(
                window=win.id,
                version=self.version,
                phi=self.phi,
                momentum=self.optimizer.momentum.copy(),
                aggregate=np.append(result.weighted_sum, result.weight_sum).astype(np.float64),
                contributors=names,
            )
        )
        stale = max((win.version - win.base_versions.get(b, win.version) for b in names), default=0)
        outcome = WindowOutcome(
            window=win.id,
            committed=True,
            reason=f"{len(names)} contributions unmasked",
            version=self.version,
            contributors=names,
            failed=self._failures(win),
            inner_steps=win.inner_steps,
            signals={**signals, "staleness_max": float(stale)},
            opened_s=win.opened,
            decision=decision,
        )
        self.outcomes.append(outcome)
        log.info("window_committed", window=win.id, version=self.version, contributors=list(names))
        for b, peer in sorted(self.peers.items()):
            if peer.live:
                out.append(Send(b, self._global(win.id)))
                peer.held_version = self.version
        out.append(outcome)
        self._try_open(now, out)

    def _control(
        self, g: np.ndarray, total: WindowSum, stats: CohortStats
    ) -> tuple[dict[str, float], str]:
        """The closed window's cohort-level signals; the controller's next H and mu."""
        norms = stats.delta_norm * total.weight_sum
        signals = SyncSignals(
            drift=stats.drift_rms,
            agreement=agreement_ratio(total.weighted_sum, norms),
            cosine=cosine(self.previous_g, g),
            loss=stats.train_loss,
        )
        self.previous_g = g
        report = {
            "drift_mean": stats.drift,
            "drift_rms": stats.drift_rms,
            "agreement": signals.agreement,
            "train_loss": stats.train_loss,
            "tokens_mean": stats.tokens,
            "weight_sum": total.weight_sum,
        }
        reason = ""
        if self.controller is not None and self.config.controller is not None:
            decision = decide(self.controller, signals, self.config.controller)
            reason = decision.reason.value
            self.controller = decision.state
            self.inner_steps, self.mu = decision.inner_steps, decision.mu
            log.info(
                "sync_decision",
                inner_steps=self.inner_steps,
                mu=self.mu,
                reason=decision.reason.value,
                detail=decision.detail,
            )
        return report, reason

    def state(self) -> CoordinatorState:
        """What to persist to resume after a restart (an open window is not resumed: its
        boundaries keep their unspent deltas and contribute them to a later window)."""
        return CoordinatorState(
            window=self.window_id,
            version=self.version,
            phi=self.phi,
            momentum=self.optimizer.momentum,
            contributors=self.contributors,
            controller=self.controller,
            committed=self.committed,
        )
