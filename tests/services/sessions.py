"""Real window sessions in this process: a coordinator gRPC server on an ephemeral port
running `CoordinatorSessions`, and agents that dial out to it with `AgentSession`, each
running the protocol cores with scripted deltas (tests/protocol/harness.py). With `audit`
set, a real audit log server runs too, every party records what crosses on it (its
identity key signs both its records and its protocol messages), and the coordinator
declares a real run (`RunDeclaration`) in Welcome."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.record import LOG_PARTY, AuditRecord, Role
from echelon.audit.store import read_records
from echelon.controller import SyncControllerConfig
from echelon.declaration import ModelIdentity, RunDeclaration, SecureAggregationConfig
from echelon.protocol import (
    COORDINATOR,
    BoundaryCore,
    CoordinatorCore,
    CoordinatorState,
    ProtocolConfig,
    TrainedDelta,
)
from echelon.protocol.events import Command, CommitVersion, Event, Train
from echelon.protocol.messages import ToCoordinator
from echelon.trust.kit import load_kit
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_tools.provision import FederationSpec, provision, rotate
from services.audit_log.server import AuditLogConfig, AuditLogServer, create_server
from services.boundary_agent.session import AgentSession, Backoff, Hello, session_trust
from services.common.audited import AuditedPeer
from services.common.bootstrap import audited_peer, record_manifest
from services.common.identity import load_or_create_identity
from services.common.server import RunningServer, ServerConfig, start_server
from services.common.transport import Transport
from services.global_coordinator.servicer import CoordinatorServicer
from services.global_coordinator.session import CoordinatorSessions, SessionServicer
from services.global_coordinator.store import CoordinatorStore, restore_state
from tests.protocol.harness import DIM, ScriptedTrainer, protocol_config

LAYOUT, BASE, TOKENIZER = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
MODEL = ModelIdentity(LAYOUT, BASE, TOKENIZER, DIM)
Gate = Callable[["Sites", str, Train], None]
AUDIT_DB = Path("audit") / "log.db"
AUDITOR = "auditor"
ORGS = ("org-a", "org-b", "org-c")


def federation_config(**overrides: object) -> ProtocolConfig:
    """One window (unless overridden) that opens only with the whole federation joined (so
    its cohort does not depend on which session came up first); silence costs a stage (1 s)
    or the deadline (2 s)."""
    base = protocol_config()
    config = replace(
        base,
        window=replace(base.window, deadline_s=2.0, min_cohort=3),
        round_timeout_s=1.0,
        windows=1,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


class RecordingCore(CoordinatorCore):
    """The coordinator's core, keeping every version it commits (for the tests' checks)."""

    def __init__(self, config: ProtocolConfig, state: CoordinatorState | None = None) -> None:
        super().__init__(config, dim=DIM, identities={}, state=state)
        self.commits: list[CommitVersion] = []

    def handle(self, event: Event, now: float) -> list[Command]:
        commands = super().handle(event, now)
        self.commits.extend(c for c in commands if isinstance(c, CommitVersion))
        return commands


def declaration(config: ProtocolConfig) -> RunDeclaration:
    """The run declaration that states `config`'s rules (and so the audit policy)."""
    return RunDeclaration(
        run_id=config.run_id,
        model=MODEL,
        secagg=SecureAggregationConfig(
            level2=config.level2, k_min=config.policy.k_min, clip=config.secagg.clip
        ),
        window=config.window,
        staleness=config.staleness,
        outer=config.outer,
        adaptive_h=config.controller is not None,
        controller=config.controller or SyncControllerConfig(),
        delay_aware=config.delay_aware,
        buffered=config.buffered,
        token_unit=config.token_unit,
        clip_norm=config.policy.clip_norm,
        stats=config.stats,
        round_timeout_s=config.round_timeout_s,
    )


@dataclass
class Audit:
    """A real audit log server and each party's audited wire."""

    root: Path
    server: AuditLogServer
    peers: dict[str, AuditedPeer] = field(default_factory=dict)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.root / AUDIT_DB

    def flush(self) -> None:
        """Waits until every party's pipelined records are on the log."""
        for party, peer in self.peers.items():
            if peer.pipeline is not None:
                assert peer.pipeline.flush(30.0), f"{party}'s records did not reach the log"

    def records(self) -> list[AuditRecord]:
        self.flush()
        return read_records(self.db)

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        for channel in self.channels:
            channel.close()
        self.server.stop(0)


@dataclass
class Sites:
    coordinator: CoordinatorSessions
    server: RunningServer
    agents: dict[str, AgentSession]
    trainers: dict[str, ScriptedTrainer]
    audit: Audit | None = None

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

    def records(self) -> list[AuditRecord]:
        assert self.audit is not None, "start_sites(..., audit=path) for an audit log"
        return self.audit.records()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.coordinator.stop()
        self.server.stop(0)
        if self.coordinator.store is not None:
            self.coordinator.store.close()
        if self.audit is not None:
            self.audit.close()


def start_sites(
    config: ProtocolConfig,
    names: tuple[str, ...] = ORGS,
    *,
    gate: Gate | None = None,
    fault: Callable[[str, ToCoordinator], ToCoordinator | None] | None = None,
    audit: Path | None = None,
    configs: Mapping[str, ProtocolConfig] | None = None,
    trainer: Callable[[str], ScriptedTrainer] = ScriptedTrainer,
    state: Path | None = None,
    kits: Path | None = None,
    revoked: tuple[str, ...] = (),
) -> Sites:
    """Starts the coordinator and the agents; `gate(sites, boundary, train)` may hold a
    training run until a protocol event (it is called in the agent's training thread).
    `audit` (a directory) starts an audit log server there that every party records on;
    `configs` gives a boundary's core another configuration than `config` (e.g. its own
    staleness bound); `trainer(boundary)` makes each boundary's scripted trainer; `state`
    (a directory) gives the coordinator a durable store there, as its main has, which it
    resumes from and commits every version to. `kits` (a directory; needs `audit`)
    provisions a federation there and runs every party from its kit, as their mains do
    with `[service].kit`: mTLS on every channel, the manifest's keys and run; `revoked`
    boundaries are provisioned too and then removed by a rotation to version 2 (`names`
    are the ones that remain and run; the revoked keep their version-1 kits)."""
    transports = _transports(config, names, kits, audit, revoked)
    store = None if state is None else CoordinatorStore(state)
    core = RecordingCore(config, None if store is None else restore_state(store, DIM))
    log: Audit | None = None
    run_config = b""
    keys: dict[str, Ed25519PrivateKey] = {}
    if audit is not None:
        declared = declaration(config)
        run_config = declared.to_canonical_bytes()
        log = Audit(
            audit,
            create_server(
                AuditLogConfig(data_dir=audit / "audit", origin="echelon.test/sites"),
                transports.get(LOG_PARTY),
            ),
        )
        address = f"127.0.0.1:{log.server.port}"
        assert log.server.log is not None
        log_key = log.server.log.signer.verifier_key()
        for party, role in [(COORDINATOR, Role.COORDINATOR)] + [(b, Role.BOUNDARY) for b in names]:
            transport = transports.get(party)
            kit = None if transport is None else transport.kit
            identity = load_or_create_identity(party, audit / party / "identity", kit)
            # agents pipeline their appends, as their main does; the coordinator does not
            peer, channel = audited_peer(
                party,
                role,
                identity,
                declared.policy(),
                address,
                transport=transport,
                pipelined=role is Role.BOUNDARY,
                log_key=log_key,  # every append proven in its answer, as the mains do
            )
            log.peers[party], keys[party] = peer, identity.key
            log.channels.append(channel)
        if transports:  # the run's manifest on the log, as the coordinator's main records it
            kit = transports[COORDINATOR].kit
            assert kit is not None
            record_manifest(log.peers[COORDINATOR], kit.signed_manifest, 0)
    coordinator = transports.get(COORDINATOR)
    sessions = CoordinatorSessions(
        lambda model: (core, run_config),
        run_id=config.run_id,
        store=store,
        audit=None if log is None else log.peers[COORDINATOR],
        manifest=None if coordinator is None else coordinator.manifest,
    )
    servicer: coordinator_pb2_grpc.CoordinatorServicer = SessionServicer(sessions)  # type: ignore[abstract]
    if coordinator is not None:  # the coordinator's whole service, as its main serves it
        assert store is not None, "a federation's coordinator keeps its versions: give `state`"
        servicer = CoordinatorServicer(
            sessions=sessions,
            store=store,
            transport=coordinator,
            audit=None if log is None else log.peers[COORDINATOR],
        )
    server = start_server(
        ServerConfig(),
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        ["echelon.coordinator.v1.Coordinator"],
        credentials=None if coordinator is None else coordinator.server_credentials(),
    )
    for b in names:
        keys.setdefault(b, Ed25519PrivateKey.generate())
    public = {b: keys[b].public_key() for b in names}
    sites = Sites(sessions, server, {}, {}, log)
    theta0 = np.zeros(DIM, dtype=np.float32)
    for b in names:
        scripted = trainer(b)
        sites.trainers[b] = scripted

        def train(command: Train, b: str = b, scripted: ScriptedTrainer = scripted) -> TrainedDelta:
            if gate is not None:
                gate(sites, b, command)
            result, _ = scripted.train(command, 0.0)
            return result

        boundary_fault = None
        if fault is not None:

            def boundary_fault(message: ToCoordinator, b: str = b) -> ToCoordinator | None:
                assert fault is not None
                return fault(b, message)

        core_b = BoundaryCore(
            (configs or {}).get(b, config),
            boundary=b,
            theta0=theta0,
            identity=keys[b],
            identities=public,
            rounding_seed=7,
        )
        own = transports.get(b)
        agent = AgentSession(
            _built(core_b),
            address=sites.address,
            hello=Hello(
                boundary=b,
                identity_key=public[b].public_bytes_raw(),
                devices=scripted.devices,
                dim=DIM,
                layout_digest=LAYOUT,
                base_model_digest=BASE,
                tokenizer_digest=TOKENIZER,
            ),
            run_id=config.run_id,
            train=train,
            rebase=scripted.rebase,
            fault=boundary_fault,
            backoff=Backoff(first_s=0.05, max_s=0.5),
            audit=None if log is None else log.peers[b],
            **({} if own is None else session_trust(own, b)),
        )
        sites.agents[b] = agent
    for agent in sites.agents.values():
        agent.start()
    return sites


def _transports(
    config: ProtocolConfig,
    names: tuple[str, ...],
    kits: Path | None,
    audit: Path | None,
    revoked: tuple[str, ...] = (),
) -> dict[str, Transport]:
    """Each party's transport from a federation provisioned in `kits` (none without)."""
    if kits is None:
        return {}
    assert audit is not None, "a federation runs with its audit log: give `audit` too"
    boundaries = (*names, *revoked)
    provision(
        FederationSpec(declaration=declaration(config), boundaries=boundaries, auditors=(AUDITOR,)),
        kits,
        now=datetime.now(UTC),
    )
    if revoked:
        rotate(kits, revoked)
    return {party: Transport(load_kit(kits / party)) for party in (COORDINATOR, LOG_PARTY, *names)}


def _built(core: BoundaryCore) -> Callable[[object], BoundaryCore]:
    return lambda welcome: core


def hold_until(predicate: Callable[[Sites], bool]) -> Callable[[Sites], None]:
    """A gate body: blocks the training thread until the coordinator's state satisfies
    `predicate` (checked after each of its events)."""

    def wait(sites: Sites) -> None:
        ok = sites.coordinator.wait(lambda: predicate(sites), 60.0)
        assert ok, "gate never opened"

    return wait
