"""Real window sessions in this process: a coordinator gRPC server on an ephemeral port
running `CoordinatorSessions`, and agents that dial out to it with `AgentSession`, each
running the protocol cores with scripted deltas (tests/protocol/harness.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.protocol import BoundaryCore, CoordinatorCore, ProtocolConfig, TrainedDelta
from echelon.protocol.events import Command, CommitVersion, Event, Train
from echelon.protocol.messages import ToCoordinator
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from services.boundary_agent.session import AgentSession, Backoff, Hello
from services.common.server import RunningServer, ServerConfig, start_server
from services.global_coordinator.session import CoordinatorSessions, SessionServicer
from tests.protocol.harness import DIM, ScriptedTrainer

LAYOUT, BASE, TOKENIZER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
Gate = Callable[["Sites", str, Train], None]


class RecordingCore(CoordinatorCore):
    """The coordinator's core, keeping every version it commits (for the tests' checks)."""

    def __init__(self, config: ProtocolConfig) -> None:
        super().__init__(config, dim=DIM, identities={})
        self.commits: list[CommitVersion] = []

    def handle(self, event: Event, now: float) -> list[Command]:
        commands = super().handle(event, now)
        self.commits.extend(c for c in commands if isinstance(c, CommitVersion))
        return commands


@dataclass
class Sites:
    coordinator: CoordinatorSessions
    server: RunningServer
    agents: dict[str, AgentSession]
    trainers: dict[str, ScriptedTrainer]

    @property
    def commits(self) -> list[CommitVersion]:
        core = self.coordinator.core
        assert isinstance(core, RecordingCore)
        return core.commits

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, timeout_s: float = 60.0) -> bool:
        c = self.coordinator
        return c.wait(lambda: c.pinned and c.core.done, timeout_s)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.coordinator.stop()
        self.server.stop(0)


def start_sites(
    config: ProtocolConfig,
    names: tuple[str, ...] = ("org-a", "org-b", "org-c"),
    *,
    gate: Gate | None = None,
    fault: Callable[[str, ToCoordinator], ToCoordinator | None] | None = None,
) -> Sites:
    """Starts the coordinator and the agents; `gate(sites, boundary, train)` may hold a
    training run until a protocol event (it is called in the agent's training thread)."""
    core = RecordingCore(config)
    sessions = CoordinatorSessions(lambda model: (core, b""), run_id=config.run_id)
    server = start_server(
        ServerConfig(),
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
            SessionServicer(sessions), s
        ),
        ["echelon.coordinator.v1.Coordinator"],
    )
    keys = {b: Ed25519PrivateKey.generate() for b in names}
    public = {b: k.public_key() for b, k in keys.items()}
    sites = Sites(sessions, server, {}, {})
    theta0 = np.zeros(DIM, dtype=np.float32)
    for b in names:
        trainer = ScriptedTrainer(b)
        sites.trainers[b] = trainer

        def train(command: Train, b: str = b, trainer: ScriptedTrainer = trainer) -> TrainedDelta:
            if gate is not None:
                gate(sites, b, command)
            result, _ = trainer.train(command, 0.0)
            return result

        boundary_fault = None
        if fault is not None:

            def boundary_fault(message: ToCoordinator, b: str = b) -> ToCoordinator | None:
                assert fault is not None
                return fault(b, message)

        core_b = BoundaryCore(
            config, boundary=b, theta0=theta0, identity=keys[b], identities=public, rounding_seed=7
        )
        agent = AgentSession(
            lambda welcome, core_b=core_b: core_b,
            address=sites.address,
            hello=Hello(
                boundary=b,
                identity_key=public[b].public_bytes_raw(),
                devices=trainer.devices,
                dim=DIM,
                layout_digest=LAYOUT,
                base_model_digest=BASE,
                tokenizer_digest=TOKENIZER,
            ),
            run_id=config.run_id,
            train=train,
            rebase=trainer.rebase,
            fault=boundary_fault,
            backoff=Backoff(first_s=0.05, max_s=0.5),
        )
        sites.agents[b] = agent
    for agent in sites.agents.values():
        agent.start()
    return sites


def hold_until(predicate: Callable[[Sites], bool]) -> Callable[[Sites], None]:
    """A gate body: blocks the training thread until the coordinator's state satisfies
    `predicate` (checked after each of its events)."""

    def wait(sites: Sites) -> None:
        ok = sites.coordinator.wait(lambda: predicate(sites), 60.0)
        assert ok, "gate never opened"

    return wait
