"""A scripted world for the protocol cores: boundaries whose "devices" return fixed deltas
(seeded per boundary and version), run by the simulator's executor on a virtual clock, with
a fault hook that rewrites or drops any message a party sends."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.outer import OuterConfig
from echelon.protocol import BoundaryCore, CoordinatorCore, ProtocolConfig, TrainedDelta
from echelon.protocol.events import Rebase, Train
from echelon.protocol.stats import StatRanges
from echelon.sim.executor import Fault, FixedLatency, Trace, VirtualExecutor
from echelon.staleness import StalenessConfig, StalenessKind
from echelon.window import WindowConfig

DIM = 40
TOKENS = 1000

FEDAVG = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)


def scripted_delta(boundary: str, version: int, fresh: bool = True) -> np.ndarray:
    seed = [sum(map(ord, boundary)), version, int(fresh)]
    return np.random.default_rng(seed).normal(0.0, 0.01, DIM).astype(np.float32)


@dataclass
class ScriptedTrainer:
    """Fixed deltas; `seconds` of virtual compute per run; records what it produced."""

    boundary: str
    seconds: float = 1.0
    devices: int = 2
    produced: list[TrainedDelta] = field(default_factory=list)
    rebases: list[Rebase] = field(default_factory=list)

    def train(self, command: Train, now: float) -> tuple[TrainedDelta, float]:
        delta = scripted_delta(self.boundary, command.version, command.fresh)
        result = TrainedDelta(
            delta=delta,
            base_version=command.version,
            tokens=TOKENS * command.steps,
            devices=self.devices,
            train_loss=2.0,
        )
        self.produced.append(result)
        return result, self.seconds

    def rebase(self, command: Rebase) -> None:
        self.rebases.append(command)


def protocol_config(**overrides: object) -> ProtocolConfig:
    base = ProtocolConfig(
        run_id="test-run",
        window=WindowConfig(inner_steps=1, deadline_s=10.0, m_min=2, min_cohort=2),
        outer=FEDAVG,
        staleness=StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=4),
        token_unit=float(TOKENS),
        round_timeout_s=5.0,
        stats=StatRanges(tokens=8.0 * TOKENS),
        windows=3,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass
class World:
    executor: VirtualExecutor
    coordinator: CoordinatorCore
    boundaries: dict[str, BoundaryCore]
    trainers: dict[str, ScriptedTrainer]

    def run(self, max_time_s: float = 1000.0) -> Trace:
        return self.executor.run(until=lambda: self.coordinator.done, max_time_s=max_time_s)


def make_world(
    names: tuple[str, ...] = ("org-a", "org-b", "org-c"),
    *,
    config: ProtocolConfig | None = None,
    seconds: dict[str, float] | None = None,
    fault: Fault | None = None,
    latency_s: float = 0.05,
) -> World:
    cfg = config or protocol_config()
    keys = {b: Ed25519PrivateKey.generate() for b in names}
    public = {b: k.public_key() for b, k in keys.items()}
    coordinator = CoordinatorCore(cfg, dim=DIM, identities=public)
    theta0 = np.zeros(DIM, dtype=np.float32)
    boundaries = {
        b: BoundaryCore(
            cfg, boundary=b, theta0=theta0, identity=keys[b], identities=public, rounding_seed=7
        )
        for b in names
    }
    trainers = {b: ScriptedTrainer(b, (seconds or {}).get(b, 1.0)) for b in names}
    executor = VirtualExecutor(
        coordinator,
        boundaries,
        dict(trainers),
        FixedLatency(latency_s),
        fault=fault,
        record_messages=True,
    )
    executor.start()
    return World(executor, coordinator, boundaries, trainers)
