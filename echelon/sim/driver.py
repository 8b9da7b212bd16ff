"""The simulator's window driver: a discrete-event loop on a virtual clock that runs any
`Strategy` with the services' own decisions (`echelon.window` for cohorts, closing and
unmasking, `echelon.staleness` for weights, `echelon.outer` for the outer step,
`echelon.controller` for H) over in-process boundaries. Nothing sleeps: compute time is
tokens / speed, a transfer is latency + bytes / bandwidth, and events fire in time order.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import structlog
import torch

from echelon.aggregation import WindowSum
from echelon.controller import (
    ControllerState,
    SyncSignals,
    agreement_ratio,
    cosine,
    decide,
    initial_state,
)
from echelon.outer import OuterOptimizer
from echelon.policy import ExportPolicy
from echelon.sim.boundary import Contribution, SimBoundary
from echelon.sim.config import SimConfig, World
from echelon.sim.data import partition
from echelon.sim.network import (
    CONTROL_BYTES,
    adapter_bytes,
    arrival_s,
    compute_end,
    reachable_at,
    vector_bytes,
)
from echelon.sim.results import Point, RunResult
from echelon.sim.secure import SIM_SECAGG, SecureAggregation, plain_aggregate
from echelon.sim.state import Kind, OpenWindow, Status, Track
from echelon.staleness import contribution_weight
from echelon.strategy import Strategy, SyncMode
from echelon.training.adapter import flatten
from echelon.training.inner import InnerConfig, evaluate
from echelon.training.model import LoraConfig, build_model, lora_state
from echelon.window import (
    BoundarySeen,
    WindowConfig,
    close_decision,
    select_cohort,
    unmask_decision,
)

log = structlog.get_logger(__name__)

#: Sequential key-agreement round trips of level-2 secure aggregation in the services
#: (AdvertiseKeys, ShareKeys, DeliverShares); ConfirmSurvivors and Unmask follow the close.
KEY_ROUNDS = 3


class Simulation:
    """One run of one strategy in one setting; `run()` returns its trajectory."""

    def __init__(self, world: World, cfg: SimConfig, strategy: Strategy) -> None:
        self.world, self.cfg, self.strategy = world, cfg, strategy
        lora = LoraConfig(
            r=cfg.lora_r, alpha=2 * cfg.lora_r, frozen_a=strategy.frozen_a, seed=cfg.seed
        )
        self.model, layout = build_model(world.model_cfg, lora, world.corpus.tokenizer.vocab_size)
        theta0 = flatten(lora_state(self.model, layout), layout)
        self.dim = int(theta0.shape[0])
        inner = InnerConfig(
            lr=strategy.inner_lr,
            mu=strategy.mu,
            warmup_steps=cfg.warmup_steps,
            total_steps=1 << 40,
            min_lr_ratio=1.0,
            batch_size=cfg.batch_size,
            seq_len=world.seq_len,
            seed=cfg.seed,
        )
        shards = partition(world.corpus.train, cfg.boundaries, cfg.devices, cfg.partition, cfg.seed)
        self.bounds = [
            SimBoundary(
                index=b,
                model=self.model,
                layout=layout,
                shards=shards[b],
                inner=inner,
                speed_tokens_s=cfg.device_tokens_s * cfg.speeds[b],
                link=cfg.link,
                seed=cfg.seed,
                theta0=theta0,
            )
            for b in range(cfg.boundaries)
        ]
        self.step_tokens = cfg.batch_size * world.seq_len
        self.policy = ExportPolicy(k_min=min(cfg.k_min, cfg.devices), clip_norm=cfg.clip_norm)
        self.phi = theta0
        self.version = 0
        self.outer = OuterOptimizer(strategy.outer, self.dim)
        ctl = strategy.controller
        self.ctl: ControllerState | None = (
            initial_state(strategy.inner_steps, strategy.mu, ctl) if ctl else None
        )
        self.h = self.ctl.inner_steps if self.ctl else strategy.inner_steps
        self.mu = strategy.mu
        self.sa = SecureAggregation(cfg.boundaries) if strategy.secure_aggregation else None
        self.rounding = np.random.default_rng([cfg.seed, 0x5EC])
        self.tracks = [Track() for _ in self.bounds]
        self.inbox: list[tuple[int, Contribution]] = []
        self.win: OpenWindow | None = None
        self.events: list[tuple[float, int, Kind, int, int]] = []
        self.in_flight: dict[int, Contribution] = {}
        self.seq = 0
        self.idle_windows = 0
        self.tokens = self.bytes = self.syncs = 0
        self.prev_g: np.ndarray | None = None
        self.last_commit = 0.0
        self.key_round_s = cfg.link.round_trip_s(1024, 4096) * KEY_ROUNDS if self.sa else 0.0
        self.keys_from = 0.0  # when the next window's key set-up may start
        self.points: list[Point] = []
        self.done = False

    # -- helpers -----------------------------------------------------------------------------
    def _at(self, t: float, kind: Kind, b: int = -1, w: int = 0) -> int:
        heapq.heappush(self.events, (t, self.seq, kind, b, w))
        self.seq += 1
        return self.seq - 1

    def _compute_s(self, b: int, steps: int) -> float:
        return steps * self.bounds[b].step_s(self.step_tokens)

    def _eval(self, theta: np.ndarray) -> float:
        self.bounds[0].devices[0].loop.set_adapter(theta)
        return evaluate(self.model, self.world.val)

    def _record(self, t: float, reason: str, comm_share: float, staleness: int = 0) -> None:
        loss = self._eval(self.phi)
        self.points.append(
            Point(
                self.tokens, self.bytes, t, self.syncs, loss, self.h, reason, comm_share, staleness
            )
        )

    def _start_cycle(self, b: int, t: float) -> None:
        bound = self.bounds[b]
        bound.start_cycle(self.phi, self.version, self.cfg.faults)
        bound.set_mu(self.mu)
        bound.train(self.h)
        self.tracks[b].status = Status.TRAINING
        self._at(compute_end(b, t, self._compute_s(b, self.h), self.cfg.faults), Kind.READY, b)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        torch.manual_seed(self.cfg.seed)
        self._record(0.0, "start", 0.0)
        if self.strategy.mode is SyncMode.LOCAL:
            return self._run_local()
        for b in range(len(self.bounds)):
            self._start_cycle(b, 0.0)
        self._at(0.0, Kind.OPEN, w=1)
        while self.events and not self.done:
            t, seq, kind, b, w = heapq.heappop(self.events)
            if kind is Kind.OPEN:
                self._open(t, w)
            elif kind is Kind.READY:
                self._ready(t, b)
            elif kind is Kind.ARRIVE:
                self._arrive(t, b, w, self.in_flight.pop(seq))
            elif kind is Kind.DEADLINE:
                # The event fires at opened + deadline_s; a hair later so rounding cannot
                # leave `now - opened` a ulp short of the deadline.
                self._check_close(t + 1e-9 * max(1.0, t), w)
            else:
                self._version(t, b, w)
        return RunResult(self.strategy.name, self.cfg.seed, tuple(self.points))

    def _run_local(self) -> RunResult:
        """No exchange: each boundary averages its own devices (level 1) and nothing else."""
        thetas = [self.phi.copy() for _ in self.bounds]
        clock = [0.0] * len(self.bounds)
        rounds = 0
        while self.tokens < self.cfg.token_budget:
            rounds += 1
            for b, bound in enumerate(self.bounds):
                bound.start_cycle(thetas[b], rounds, self.cfg.faults)
                self.tokens += bound.train(self.h)
                c = bound.contribution(self.policy)
                if c is not None:
                    thetas[b] = (thetas[b] - c.delta).astype(np.float32)
                clock[b] = compute_end(b, clock[b], self._compute_s(b, self.h), self.cfg.faults)
            loss = float(np.mean([self._eval(th) for th in thetas]))
            self.points.append(Point(self.tokens, 0, max(clock), 0, loss, self.h, "local", 0.0))
        return RunResult(self.strategy.name, self.cfg.seed, tuple(self.points))

    def _window_config(self, cohort: int) -> WindowConfig:
        s, link = self.strategy, self.cfg.link
        median = float(np.median([self._compute_s(b, self.h) for b in range(len(self.bounds))]))
        comm = (
            self.key_round_s
            + link.transfer_s(vector_bytes(self.dim))
            + link.transfer_s(adapter_bytes(self.dim))
        )
        k = min(s.buffer_k, cohort) if s.mode is SyncMode.BUFFERED else 0
        return WindowConfig(
            inner_steps=self.h,
            deadline_s=s.deadline_factor * (median + comm),
            buffer_k=k,
            m_min=2,
            min_cohort=2,
            liveness_s=1.0,
        )

    def _open(self, t: float, w: int) -> None:
        faults = self.cfg.faults
        seen = [
            BoundarySeen(str(b), t if reachable_at(b, t, faults) == t else -math.inf)
            for b in range(len(self.bounds))
        ]
        decision = select_cohort(t, seen, self._window_config(len(self.bounds)))
        self.idle_windows += 1
        if self.idle_windows > 200:
            log.warning("simulation_stalled", window=w, version=self.version)
            self.done = True
            return
        if not decision.open_window:
            later = [reachable_at(b, t, faults) for b in range(len(self.bounds))]
            self._at(min([x for x in later if x > t], default=t + 1.0), Kind.OPEN, w=w)
            return
        cohort = tuple(sorted(int(m) for m in decision.members))
        cfg = self._window_config(len(cohort))
        # The services: an OpenWindow round trip, the key rounds, then CollectDelta reaches the
        # boundary one way later; pre-keyed, the key rounds ran while the last window closed.
        link = self.cfg.link
        opened = t + link.round_trip_s(CONTROL_BYTES, CONTROL_BYTES)
        keys_from = min(opened, self.keys_from) if self.strategy.prekey else opened
        key_ready = (
            max(opened, keys_from + self.key_round_s) + link.transfer_s(CONTROL_BYTES)
            if self.sa
            else t
        )
        self.win = OpenWindow(w, self.version, t, cohort, self.h, cfg, key_ready)
        self.bytes += CONTROL_BYTES * len(cohort)
        self._at(t + cfg.deadline_s, Kind.DEADLINE, w=w)
        pending, self.inbox = self.inbox, []
        for b, c in pending:
            self._accept(t, b, c)
        for b in cohort:
            if self.tracks[b].status is Status.HOLDING:
                self._submit(t, b)
            elif self.tracks[b].status is Status.IDLE:
                # A boundary whose last export was refused starts again from the window's
                # version, which the open message delivers.
                self._start_cycle(b, t + self.cfg.link.transfer_s(adapter_bytes(self.dim)))
        self._check_close(t, w)

    def _ready(self, t: float, b: int) -> None:
        bound, track = self.bounds[b], self.tracks[b]
        self.tokens += bound.tokens_in_cycle
        contribution = bound.contribution(self.policy)
        if contribution is None:
            track.status, track.held = Status.IDLE, None
            win = self.win
            if win is not None and not win.closed and b in win.cohort and b not in win.got:
                win.failed.add(b)
                self._check_close(t, win.id)
            if self.strategy.mode is SyncMode.BUFFERED:
                self._start_cycle(b, t)
            return
        track.status, track.held = Status.HOLDING, contribution
        self._submit(t, b)

    def _submit(self, t: float, b: int) -> None:
        """Sends a held contribution: plain vectors at once, masked ones into an open window
        whose cohort has the boundary (keys exchanged first)."""
        track, win = self.tracks[b], self.win
        if track.held is None:
            return
        send = t
        if self.sa is not None:
            if win is None or win.closed or b not in win.cohort or b in win.got:
                return
            send = max(t, win.key_ready)
            track.window = win.id
        else:
            track.window = -1
        self.bytes += vector_bytes(self.dim)
        seq = self._at(
            arrival_s(b, send, vector_bytes(self.dim), self.cfg.link, self.cfg.faults),
            Kind.ARRIVE,
            b,
            track.window,
        )
        self.in_flight[seq] = track.held
        track.status = Status.SUBMITTED
        if self.strategy.mode is SyncMode.BUFFERED:
            down = self.cfg.link.round_trip_s(CONTROL_BYTES, adapter_bytes(self.dim))
            self.bytes += CONTROL_BYTES + adapter_bytes(self.dim)
            self._start_cycle(b, send + down)  # FedBuff: fetch the newest version, train again
        elif self.strategy.delay_aware:
            self.bounds[b].begin_flight()
            track.flight_start = send

    def _arrive(self, t: float, b: int, w: int, contribution: Contribution) -> None:
        track, win = self.tracks[b], self.win
        if self.strategy.mode is SyncMode.BUFFERED and track.held is contribution:
            track.held = None
        masked = self.sa is not None
        if (
            win is None
            or win.closed
            or (masked and win.id != w)
            or b in win.got
            or (b not in win.cohort)
        ):
            if masked:  # a late masked vector is rejected; the delta stays in its boundary
                track.status = Status.HOLDING
                self._submit(t, b)
            else:
                self.inbox.append((b, contribution))
            return
        self._accept(t, b, contribution)
        self._check_close(t, win.id)

    def _accept(self, t: float, b: int, c: Contribution) -> None:
        win = self.win
        assert win is not None
        tau = win.version - c.base_version
        unit = self.cfg.devices * win.inner_steps * self.step_tokens
        weight = contribution_weight(c.tokens, tau, self.strategy.staleness, unit)
        if weight is None or weight <= 0:
            log.debug("contribution_too_stale", boundary=b, tau=tau)
            if self.tracks[b].held is c:
                self.tracks[b].held = None
                self.tracks[b].status = Status.IDLE
            if self.strategy.mode is not SyncMode.BUFFERED:
                self._start_cycle(b, t)
            return
        if b not in win.cohort:
            win.cohort = tuple(sorted((*win.cohort, b)))
        win.got[b] = (c, min(weight, SIM_SECAGG.max_weight))

    def _check_close(self, t: float, w: int) -> None:
        win = self.win
        if win is None or win.id != w or win.closed:
            return
        decision = close_decision(
            t,
            opened_s=win.opened,
            cohort_size=len(win.cohort),
            collected=len(win.got),
            failed=len(win.failed),
            config=win.config,
        )
        if decision.close:
            self._close(t, win, decision.detail)

    def _roll_over(self, t: float, win: OpenWindow) -> None:
        self.keys_from = t
        for b, (c, _) in win.got.items():
            if self.sa is not None:
                self.tracks[b].status, self.tracks[b].held = Status.HOLDING, c
            else:
                self.inbox.append((b, c))
        self._at(t, Kind.OPEN, w=win.id + 1)

    def _close(self, t: float, win: OpenWindow, detail: str) -> None:
        win.closed = True
        gate = unmask_decision(len(win.got), win.config)
        if not gate.unmask:
            self._roll_over(t, win)
            return
        vectors = {b: c.delta for b, (c, _) in win.got.items()}
        weights = {b: w for b, (_, w) in win.got.items()}
        if self.sa is not None:
            outcome = self.sa.aggregate(
                window=win.id,
                cohort=win.cohort,
                vectors=vectors,
                weights=weights,
                rng=self.rounding,
            )
        else:
            outcome = plain_aggregate(win.cohort, vectors, weights)
        rounds = list(outcome.rounds.values())
        self.bytes += sum(r.setup_up + r.setup_down + r.finish_up + r.finish_down for r in rounds)
        if outcome.total is None:
            log.info("window_aborted", window=win.id, reason=outcome.reason)
            self._roll_over(t, win)
            return
        link = self.cfg.link
        if self.sa is not None:
            worst = max(rounds, key=lambda r: r.setup_up + r.setup_down)
            self.key_round_s = KEY_ROUNDS * link.round_trip_s(
                worst.setup_up // KEY_ROUNDS, worst.setup_down // KEY_ROUNDS
            )
            fin = max(rounds, key=lambda r: r.finish_up + r.finish_down)
            self.keys_from = t
            t += link.round_trip_s(64, fin.finish_down) + link.round_trip_s(fin.finish_up, 64)
        self._commit(t, win, outcome.total, detail)

    def _commit(self, t: float, win: OpenWindow, total: WindowSum, detail: str) -> None:
        self.idle_windows = 0
        g = total.pseudo_gradient()
        self.phi = self.outer.step(self.phi, g)
        self.version += 1
        self.syncs += 1
        got = win.got
        norms = sum(w * float(np.linalg.norm(c.delta)) for c, w in got.values())
        signals = SyncSignals(
            drift=max(c.drift for c, _ in got.values()),
            agreement=agreement_ratio(total.weighted_sum, norms),
            cosine=cosine(self.prev_g, g),
            loss=sum(c.loss * c.tokens for c, _ in got.values())
            / max(1, sum(c.tokens for c, _ in got.values())),
        )
        self.prev_g = g
        reason = detail
        if self.ctl is not None and self.strategy.controller is not None:
            decision = decide(self.ctl, signals, self.strategy.controller)
            self.ctl, self.h, self.mu = decision.state, decision.inner_steps, decision.mu
            reason = f"{decision.reason.value}: {decision.detail}"
            log.debug("sync_controller", window=win.id, h=self.h, reason=reason)
        slowest = max(self._compute_s(b, win.inner_steps) for b in got)
        span = max(t - self.last_commit, 1e-9)
        self.last_commit = t
        tau = max(win.version - c.base_version for c, _ in got.values())
        self._record(t, reason, max(0.0, 1.0 - slowest / span), tau)
        for b in got:
            self.tracks[b].wait_version = self.version
        if self.tokens >= self.cfg.token_budget:
            self.done = True
            return
        if self.strategy.mode is SyncMode.BUFFERED:
            self._at(t, Kind.OPEN, w=win.id + 1)
            return
        # The services deliver the version (a round trip) and then open the next window; a
        # boundary starts training when that open arrives. Delay-aware ones re-base on arrival.
        link = self.cfg.link
        start = 0.0 if self.strategy.delay_aware else 2 * link.transfer_s(CONTROL_BYTES)
        for b in range(len(self.bounds)):
            self.bytes += adapter_bytes(self.dim)
            self._at(
                arrival_s(b, t, adapter_bytes(self.dim), link, self.cfg.faults) + start,
                Kind.VERSION,
                b,
                self.version,
            )
        self._at(
            t + link.round_trip_s(adapter_bytes(self.dim), CONTROL_BYTES), Kind.OPEN, w=win.id + 1
        )

    def _version(self, t: float, b: int, v: int) -> None:
        track, bound = self.tracks[b], self.bounds[b]
        waiting = track.status is Status.SUBMITTED and (
            track.wait_version is not None and v >= track.wait_version
        )
        if not (waiting or track.status is Status.IDLE) or v != self.version:
            return
        track.wait_version = None
        if not (self.strategy.delay_aware and waiting):
            self._start_cycle(b, t)
            return
        step_s = bound.step_s(self.step_tokens)
        extra = min(self.h, int((t - track.flight_start) / step_s))
        bound.train(extra)
        bound.rebase(self.phi, v, self.cfg.faults, self.strategy.rebase_carry)
        bound.set_mu(self.mu)
        remaining = self.h - bound.steps_in_cycle
        if remaining > 0:
            bound.train(remaining)
        track.status = Status.TRAINING
        self._at(
            compute_end(b, t, self._compute_s(b, max(0, remaining)), self.cfg.faults), Kind.READY, b
        )


def simulate(world: World, cfg: SimConfig, strategy: Strategy) -> RunResult:
    """Runs one strategy in one setting; bit-identical for equal inputs on CPU."""
    torch.set_num_threads(1)
    return Simulation(world, cfg, strategy).run()


__all__ = ["Point", "RunResult", "Simulation", "simulate"]
