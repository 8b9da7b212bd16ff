"""In-process Echelon sites for protocol tests: a real audit log server, real boundary agent
servicers on ephemeral ports and the real coordinator driver, all over real gRPC.

Training is replaced by `ScriptedTrainer`, which returns a fixed, known delta per boundary,
so a test can compute the exact global update the protocol must produce. A late or absent
boundary is a hold in the sites' `FaultPlan` at the trainer's `training` stage, released by
the test (or by another stage) when the protocol has got where the test wants it. These tests are
about the wire protocol and secure aggregation; real training runs in the end-to-end tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from echelon.audit.policy import Policy
from echelon.audit.record import Role
from echelon.controller import SyncControllerConfig
from echelon.declaration import ModelIdentity
from echelon.policy import ExportPolicy
from echelon.staleness import StalenessConfig
from echelon.window import WindowConfig
from echelon_proto.boundary.v1 import boundary_pb2_grpc
from services.audit_log.server import AuditLogConfig, AuditLogServer, create_server
from services.boundary_agent.runtime import BoundaryRuntime, TrainedDelta, WindowSpec
from services.boundary_agent.secure import SecureAggregationSession
from services.boundary_agent.servicer import BoundaryAgentServicer
from services.common.audited import AuditedPeer
from services.common.bootstrap import audited_peer
from services.common.identity import load_or_create_identity
from services.common.server import RunningServer, ServerConfig, start_server
from services.global_coordinator.config import CoordinatorConfig, SecureAggregationConfig
from services.global_coordinator.declaration import DeclarationPublisher
from services.global_coordinator.driver import WindowDriver
from services.global_coordinator.registry import Registry
from services.global_coordinator.store import CoordinatorStore, Registration

from ..faults import FaultPlan

DIM = 1000
TOKEN_UNIT = 1000.0
# The scripted trainer reports this stage to the sites' plan before it returns a delta.
TRAINING = "training"


def known_delta(boundary: str) -> np.ndarray:
    seed = sum(boundary.encode())
    return (np.random.default_rng(seed).standard_normal(DIM) * 0.01).astype(np.float32)


def known_tokens(boundary: str) -> int:
    return 1000 * (1 + sum(boundary.encode()) % 3)


@dataclass
class ScriptedTrainer:
    """Returns `known_delta(boundary)` once `faults` lets it past the `training` stage."""

    boundary: str
    faults: FaultPlan
    devices: int = 2
    calls: list[int] = field(default_factory=list)
    thetas: list[np.ndarray] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __call__(self, theta: np.ndarray, version: int, spec: WindowSpec) -> TrainedDelta:
        self.calls.append(spec.window)
        self.thetas.append(theta.copy())
        self.steps.append(spec.inner_steps)
        self.faults.reached(self.boundary, TRAINING, spec.window)
        return TrainedDelta(
            delta=known_delta(self.boundary),
            base_version=version,
            tokens=known_tokens(self.boundary),
            devices=self.devices,
            train_loss=1.0,
            val_loss=1.0,
            drift=0.01,
        )


@dataclass
class Agent:
    boundary: str
    runtime: BoundaryRuntime
    servicer: BoundaryAgentServicer
    server: RunningServer
    trainer: ScriptedTrainer
    identity_key: bytes
    audit: AuditedPeer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stub(self) -> boundary_pb2_grpc.BoundaryAgentStub:
        return boundary_pb2_grpc.BoundaryAgentStub(grpc.insecure_channel(self.address))


class Sites:
    """An audit log, N agents and a coordinator driver, in this process."""

    def __init__(
        self,
        root: Path,
        boundaries: list[str],
        *,
        level2: bool = True,
        deadline_s: float = 20.0,
        controller: SyncControllerConfig | None = None,
        buffer_k: int = 0,
        servicer_class: Callable[..., BoundaryAgentServicer] = BoundaryAgentServicer,
        faults: FaultPlan | None = None,
    ) -> None:
        self.root = root
        self.faults = faults or FaultPlan()
        self.audit_server: AuditLogServer = create_server(
            AuditLogConfig(data_dir=root / "audit", origin="echelon.test/sites")
        )
        self.audit_address = f"127.0.0.1:{self.audit_server.port}"
        self.policy = Policy(m_min=2, k_min=2, level1=True, level2=level2)
        self.agents: dict[str, Agent] = {}
        self._channels: list[grpc.Channel] = []
        for b in boundaries:
            self.agents[b] = self._agent(b, servicer_class)
        self.config = CoordinatorConfig(
            run_id="test",
            token_unit=TOKEN_UNIT,
            abort_backoff_s=0.1,
            window=WindowConfig(
                inner_steps=2, deadline_s=deadline_s, min_cohort=2, m_min=2, buffer_k=buffer_k
            ),
            secagg=SecureAggregationConfig(level2=level2),
            adaptive_h=controller is not None,
            controller=controller or SyncControllerConfig(),
        )
        ident = load_or_create_identity("coordinator", root / "coordinator" / "identity")
        self.coordinator_audit, channel = audited_peer(
            "coordinator", Role.COORDINATOR, ident, self.policy, self.audit_address
        )
        self._channels.append(channel)
        self.store = CoordinatorStore(root / "coordinator" / "state")
        self.registry = Registry(self.store)
        model = ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, DIM)
        for b, agent in self.agents.items():
            self.registry.register(
                Registration(b, agent.address, agent.identity_key, 2), model, time.time()
            )
        DeclarationPublisher(
            config=self.config,
            registry=self.registry,
            store=self.store,
            audit=self.coordinator_audit,
        )()
        self.driver = WindowDriver(
            config=self.config,
            store=self.store,
            registry=self.registry,
            audit=self.coordinator_audit,
        )

    def _agent(self, boundary: str, servicer_class: Callable[..., BoundaryAgentServicer]) -> Agent:
        ident = load_or_create_identity(boundary, self.root / boundary)
        audit, channel = audited_peer(
            boundary, Role.BOUNDARY, ident, self.policy, self.audit_address
        )
        self._channels.append(channel)
        trainer = ScriptedTrainer(boundary, self.faults)
        runtime = BoundaryRuntime(
            boundary=boundary,
            theta0=np.zeros(DIM, np.float32),
            trainer=trainer,
            policy=ExportPolicy(k_min=2, clip_norm=10.0),
            staleness=StalenessConfig(),
            on_dropped=audit.dropped,
            on_stage=self.faults.observer(boundary),
        )
        secure = SecureAggregationSession(boundary, ident.key)
        servicer = servicer_class(runtime, audit, secure, b"\x01" * 32)
        server = start_server(
            ServerConfig(),
            lambda s: boundary_pb2_grpc.add_BoundaryAgentServicer_to_server(servicer, s),
            ["echelon.boundary.v1.BoundaryAgent"],
        )
        return Agent(boundary, runtime, servicer, server, trainer, ident.public_key, audit)

    def heartbeat_all(self) -> None:
        for b in self.agents:
            self.registry.heartbeat(b, time.time())

    def close(self) -> None:
        self.faults.release_all()
        self.driver.close()
        for agent in self.agents.values():
            agent.server.stop(0)
        for channel in self._channels:
            channel.close()
        self.store.close()
        self.audit_server.stop(0)


def expected_phi(boundaries: list[str], lr: float = 0.7, momentum: float = 0.9) -> np.ndarray:
    """The first Nesterov outer step from zero momentum over these boundaries' known deltas."""
    weights = np.array([known_tokens(b) / TOKEN_UNIT for b in boundaries])
    deltas = np.stack([known_delta(b).astype(np.float64) for b in boundaries])
    g = (weights[:, None] * deltas).sum(axis=0) / weights.sum()
    return -lr * (1 + momentum) * g
