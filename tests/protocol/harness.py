"""A scripted world for the protocol cores: boundaries whose "devices" return fixed deltas
(seeded per boundary and version), run by the simulator's executor on a virtual clock, with
a fault hook that rewrites or drops any message a party sends; the hostile-party matrix
(`HOSTILE`, `corrupt`) and the version the cores must commit (`expected_phi`), which the
tests over the real services share (tests/services/test_hostile_sessions.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.outer import OuterConfig
from echelon.protocol import BoundaryCore, CoordinatorCore, ProtocolConfig, TrainedDelta
from echelon.protocol.events import CommitVersion, Rebase, Train
from echelon.protocol.messages import (
    ContributionSent,
    KeysAdvertised,
    Message,
    SharesReleased,
    SharesSent,
    SurvivorsSigned,
)
from echelon.protocol.stats import StatRanges
from echelon.sim.executor import Fault, FixedLatency, Trace, VirtualExecutor
from echelon.staleness import StalenessConfig, StalenessKind, staleness_factor
from echelon.window import WindowConfig

DIM = 40
TOKENS = 1000

FEDAVG = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)


def scripted_delta(boundary: str, version: int, fresh: bool = True) -> np.ndarray:
    seed = [sum(map(ord, boundary)), version, int(fresh)]
    return np.random.default_rng(seed).normal(0.0, 0.01, DIM).astype(np.float32)


@dataclass
class ScriptedTrainer:
    """Fixed deltas; `seconds` of virtual compute per run (or a function of the run's
    command); records what it produced."""

    boundary: str
    seconds: float | Callable[[Train], float] = 1.0
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
        return result, self.seconds(command) if callable(self.seconds) else self.seconds

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
    seconds: Mapping[str, float | Callable[[Train], float]] | None = None,
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


#: Fixed point 2^-16 per coordinate and party, plus the outer step's float32.
TOL = 1e-4


def expected_phi(
    config: ProtocolConfig,
    trainers: Mapping[str, ScriptedTrainer],
    commit: CommitVersion,
    previous: np.ndarray,
) -> np.ndarray:
    """The FedAvg step the cores must have taken from `previous`: the weighted mean of the
    contributors' latest deltas (each from its trainer's record, with its staleness)."""
    version = commit.version - 1
    num = np.zeros(DIM, dtype=np.float64)
    den = 0.0
    for b in commit.contributors:
        sent = [d for d in trainers[b].produced if d.base_version <= version]
        d = sent[-1] if sent else None
        assert d is not None
        weight = (
            d.tokens
            / config.token_unit
            * (staleness_factor(version - d.base_version, config.staleness) or 0)
        )
        num += weight * np.clip(d.delta, -config.secagg.clip, config.secagg.clip)
        den += weight
    return (previous - num / den).astype(np.float32)


#: Each message a boundary sends, and how a hostile party breaks it: "garbage" (bytes that
#: fail to parse, or a vector of the wrong length), "signature" (a bad signature or tag, or
#: a vector of the wrong dtype), "window" (another window's), "silent" (nothing at all).
HOSTILE: list[tuple[type, str]] = [
    (KeysAdvertised, "garbage"),
    (KeysAdvertised, "signature"),
    (KeysAdvertised, "window"),
    (KeysAdvertised, "silent"),
    (SharesSent, "garbage"),
    (SharesSent, "signature"),
    (SharesSent, "silent"),
    (ContributionSent, "garbage"),
    (ContributionSent, "signature"),
    (ContributionSent, "window"),
    (ContributionSent, "silent"),
    (SurvivorsSigned, "signature"),
    (SurvivorsSigned, "garbage"),
    (SurvivorsSigned, "silent"),
    (SharesReleased, "garbage"),
    (SharesReleased, "silent"),
]
HOSTILE_IDS = [f"{k.__name__}-{h}" for k, h in HOSTILE]


def corrupt(kind: type, party: str, how: str) -> Callable[[str, str, Message], Message | None]:
    """A fault that rewrites `party`'s first message of `kind`, per `how` (see `HOSTILE`)."""
    fired: list[bool] = []

    def fault(sender: str, receiver: str, message: Message) -> Message | None:
        if sender != party or not isinstance(message, kind) or fired:
            return message
        fired.append(True)
        if how == "silent":
            return None
        if how == "window":
            return replace(message, window=message.window + 7)
        if isinstance(message, KeysAdvertised):
            raw = bytearray(message.advertisement)
            if how == "garbage":
                return replace(message, advertisement=bytes(raw[:9]))
            raw[-1] ^= 1  # the signature's last bit
            return replace(message, advertisement=bytes(raw))
        if isinstance(message, SharesSent):
            if how == "garbage":
                return replace(message, shares=(b"\x00" * 5,))
            first = bytearray(message.shares[0])
            first[-1] ^= 1  # breaks the AES-GCM tag of one share
            return replace(message, shares=(bytes(first), *message.shares[1:]))
        if isinstance(message, ContributionSent):
            if how == "garbage":
                return replace(message, vector=message.vector[:-3])
            return replace(message, vector=message.vector.astype(np.float64))
        if isinstance(message, SurvivorsSigned):
            sig = bytearray(message.signature)
            sig[0] ^= 1
            return replace(message, signature=bytes(sig) if how == "signature" else b"\x01")
        if isinstance(message, SharesReleased):
            raw = bytearray(message.shares)
            return replace(message, shares=bytes(raw[: len(raw) // 2]))
        raise AssertionError(kind)

    return fault
