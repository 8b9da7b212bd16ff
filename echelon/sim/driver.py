"""The simulator: one run of one `Strategy` as the window protocol cores run it
(`echelon.protocol`), executed on a virtual clock by `echelon.sim.executor` over simulated
WAN links with outages, partitions and device churn. The cores decide everything about a
window; this module builds the world (devices, data shards, links) and records the global
model's trajectory. Compute time is tokens / speed, a transfer is latency + bytes /
bandwidth, and events fire in time order: bit-identical for equal inputs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.policy import ExportPolicy
from echelon.protocol import COORDINATOR, BoundaryCore, CoordinatorCore, ProtocolConfig
from echelon.protocol.events import CommitVersion, Rebase, Train, TrainedDelta
from echelon.protocol.stats import StatRanges
from echelon.secagg import SecAggConfig
from echelon.sim.boundary import SimBoundary
from echelon.sim.config import SimConfig, World
from echelon.sim.data import partition
from echelon.sim.executor import VirtualExecutor
from echelon.sim.network import (
    CONTROL_BYTES,
    FaultConfig,
    LinkConfig,
    adapter_bytes,
    arrival_s,
    compute_end,
    vector_bytes,
)
from echelon.sim.results import Point, RunResult
from echelon.strategy import Strategy, SyncMode
from echelon.training.adapter import flatten
from echelon.training.inner import InnerConfig, evaluate
from echelon.training.model import LoraConfig, build_model, lora_state
from echelon.window import WindowConfig

log = structlog.get_logger(__name__)

#: Fixed point with 2^-20 resolution; 16 parties of weight <= 16 cannot overflow Z_(2^32).
SIM_SECAGG = SecAggConfig(clip=1.0, frac_bits=20, max_weight=16.0, max_participants=16)

#: Sequential key-agreement round trips of level-2 secure aggregation before collection.
KEY_ROUNDS = 3


@dataclass
class SimTrainer:
    """One boundary's devices (`SimBoundary`) as the executor's trainer."""

    bound: SimBoundary
    theta0: np.ndarray
    faults: FaultConfig
    step_tokens: int

    def train(self, command: Train, now: float) -> tuple[TrainedDelta, float]:
        bound = self.bound
        if command.fresh:
            bound.start_cycle(self.theta0 + command.phi, command.version, self.faults)
        else:
            for dev in bound.devices:
                dev.at_submit = dev.theta.copy()
            bound.begin_flight()
        bound.set_mu(command.mu)
        tokens = bound.train(command.steps)
        present = [dev for dev in bound.devices if dev.present]
        if present and tokens > 0:
            mean = np.mean([dev.theta for dev in present], axis=0, dtype=np.float64)
            delta = (bound.base_theta.astype(np.float64) - mean).astype(np.float32)
        else:
            delta = np.zeros_like(self.theta0)
        result = TrainedDelta(
            delta=delta,
            base_version=bound.base_version,
            tokens=tokens,
            devices=len(present),
            train_loss=bound.loss_sum / max(1, bound.loss_steps),
        )
        seconds = command.steps * bound.step_s(self.step_tokens)
        return result, compute_end(bound.index, now, seconds, self.faults) - now

    def rebase(self, command: Rebase) -> None:
        self.bound.rebase(self.theta0 + command.phi, command.version, self.faults, command.carry)


@dataclass(frozen=True)
class SimNetwork:
    """Each boundary's link to the global plane, deferred while it is down."""

    link: LinkConfig
    faults: FaultConfig

    def arrival(self, sender: str, receiver: str, size: int, now: float) -> float | None:
        boundary = int(receiver if sender == COORDINATOR else sender)
        return arrival_s(boundary, now, size, self.link, self.faults)


def protocol_config(
    strategy: Strategy, cfg: SimConfig, deadline_s: float, unit: float
) -> ProtocolConfig:
    """The protocol configuration that runs `strategy` in setting `cfg`."""
    s = strategy
    k = s.buffer_k if s.mode is SyncMode.BUFFERED else 0
    return ProtocolConfig(
        run_id=f"sim/{cfg.seed}",
        window=WindowConfig(
            inner_steps=s.inner_steps,
            deadline_s=deadline_s,
            buffer_k=min(k, cfg.boundaries),
            m_min=2,
            min_cohort=2,
            liveness_s=1e12,
        ),
        level2=s.secure_aggregation,
        secagg=SIM_SECAGG,
        staleness=s.staleness,
        outer=s.outer,
        controller=s.controller,
        policy=ExportPolicy(k_min=min(cfg.k_min, cfg.devices), clip_norm=cfg.clip_norm),
        stats=StatRanges(tokens=16.0 * unit),
        mu=s.mu,
        buffered=s.mode is SyncMode.BUFFERED,
        delay_aware=s.delay_aware,
        prekey=s.prekey,
        rebase_carry=s.rebase_carry,
        token_unit=unit,
        round_timeout_s=deadline_s,
        retry_s=max(deadline_s / 8, 1e-3),
    )


class Simulation:
    """One run of one strategy in one setting; `run()` returns its trajectory."""

    def __init__(self, world: World, cfg: SimConfig, strategy: Strategy) -> None:
        self.world, self.cfg, self.strategy = world, cfg, strategy
        lora = LoraConfig(
            r=cfg.lora_r, alpha=2 * cfg.lora_r, frozen_a=strategy.frozen_a, seed=cfg.seed
        )
        self.model, layout = build_model(world.model_cfg, lora, world.corpus.tokenizer.vocab_size)
        self.theta0 = flatten(lora_state(self.model, layout), layout)
        self.dim = int(self.theta0.shape[0])
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
                theta0=self.theta0,
            )
            for b in range(cfg.boundaries)
        ]
        self.step_tokens = cfg.batch_size * world.seq_len
        self.policy = ExportPolicy(k_min=min(cfg.k_min, cfg.devices), clip_norm=cfg.clip_norm)
        self.h = strategy.inner_steps
        self.points: list[Point] = []

    def _compute_s(self, b: int, steps: int) -> float:
        return steps * self.bounds[b].step_s(self.step_tokens)

    def _eval(self, theta: np.ndarray) -> float:
        self.bounds[0].devices[0].loop.set_adapter(theta)
        return evaluate(self.model, self.world.val)

    def _deadline_s(self) -> float:
        """The strategy's deadline: a multiple of the window's nominal compute + transfers."""
        link = self.cfg.link
        median = float(np.median([self._compute_s(b, self.h) for b in range(len(self.bounds))]))
        keys = (
            link.round_trip_s(1024, 4096) * KEY_ROUNDS if self.strategy.secure_aggregation else 0.0
        )
        comm = (
            keys
            + link.transfer_s(vector_bytes(self.dim))
            + link.transfer_s(adapter_bytes(self.dim))
        )
        return self.strategy.deadline_factor * (median + comm + 2 * link.transfer_s(CONTROL_BYTES))

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        torch.manual_seed(self.cfg.seed)
        self.points.append(Point(0, 0, 0.0, 0, self._eval(self.theta0), self.h, "start", 0.0))
        if self.strategy.mode is SyncMode.LOCAL:
            return self._run_local()
        cfg = self.cfg
        unit = float(cfg.devices * self.strategy.inner_steps * self.step_tokens)
        pcfg = protocol_config(self.strategy, cfg, self._deadline_s(), unit)
        names = [str(b) for b in range(len(self.bounds))]
        keys = {b: Ed25519PrivateKey.generate() for b in names}
        public = {b: k.public_key() for b, k in keys.items()}
        coordinator = CoordinatorCore(pcfg, dim=self.dim, identities=public)
        cores = {
            b: BoundaryCore(
                pcfg,
                boundary=b,
                theta0=self.theta0,
                identity=keys[b],
                identities=public,
                rounding_seed=cfg.seed,
            )
            for b in names
        }
        trainers = {
            str(i): SimTrainer(bound, self.theta0, cfg.faults, self.step_tokens)
            for i, bound in enumerate(self.bounds)
        }
        executor = VirtualExecutor(
            coordinator, cores, dict(trainers), SimNetwork(cfg.link, cfg.faults)
        )
        last_commit = [0.0]

        def committed(now: float, commit: CommitVersion) -> None:
            self._record(now, commit, coordinator, executor, last_commit)

        executor.on_commit = committed
        executor.start()
        budget = cfg.token_budget
        executor.run(
            until=lambda: (
                (bool(self.points[1:]) and self.points[-1].tokens >= budget)
                or len(coordinator.outcomes) - coordinator.committed > 200
            )
        )
        if len(coordinator.outcomes) - coordinator.committed > 200:
            log.warning("simulation_stalled", version=coordinator.version)
        return RunResult(self.strategy.name, cfg.seed, tuple(self.points))

    def _record(
        self,
        now: float,
        commit: CommitVersion,
        coordinator: CoordinatorCore,
        executor: VirtualExecutor,
        last_commit: list[float],
    ) -> None:
        outcome = coordinator.outcomes[-1] if coordinator.outcomes else None
        h = outcome.inner_steps if outcome is not None else self.h
        staleness = int(outcome.signals.get("staleness_max", 0.0)) if outcome else 0
        slowest = max(self._compute_s(int(b), h) for b in commit.contributors)
        span = max(now - last_commit[0], 1e-9)
        last_commit[0] = now
        loss = self._eval(self.theta0 + commit.phi)
        trace = executor.trace
        self.points.append(
            Point(
                trace.tokens,
                sum(trace.bytes_sent.values()),
                now,
                commit.version,
                loss,
                coordinator.inner_steps,
                outcome.reason if outcome is not None else "",
                max(0.0, 1.0 - slowest / span),
                staleness,
            )
        )

    def _run_local(self) -> RunResult:
        """No exchange: each boundary averages its own devices (level 1) and nothing else."""
        thetas = [self.theta0.copy() for _ in self.bounds]
        clock = [0.0] * len(self.bounds)
        rounds = 0
        tokens = 0
        while tokens < self.cfg.token_budget:
            rounds += 1
            for b, bound in enumerate(self.bounds):
                bound.start_cycle(thetas[b], rounds, self.cfg.faults)
                tokens += bound.train(self.h)
                c = bound.contribution(self.policy)
                if c is not None:
                    thetas[b] = (thetas[b] - c.delta).astype(np.float32)
                clock[b] = compute_end(b, clock[b], self._compute_s(b, self.h), self.cfg.faults)
            loss = float(np.mean([self._eval(th) for th in thetas]))
            self.points.append(Point(tokens, 0, max(clock), 0, loss, self.h, "local", 0.0))
        return RunResult(self.strategy.name, self.cfg.seed, tuple(self.points))


def simulate(world: World, cfg: SimConfig, strategy: Strategy) -> RunResult:
    """Runs one strategy in one setting; bit-identical for equal inputs on CPU."""
    torch.set_num_threads(1)
    return Simulation(world, cfg, strategy).run()


__all__ = ["Point", "RunResult", "Simulation", "simulate"]
