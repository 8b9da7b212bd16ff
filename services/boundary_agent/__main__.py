"""Runs a boundary agent: `python -m services.boundary_agent --config FILE.toml`.

TOML tables: [server], [service] (data_dir, audit, metrics_port, log_level),
[agent] (boundary, coordinator, advertise_host, heartbeat_s), [devices], [data],
[tokenizer], [model], [lora], [inner], [policy]. The agent starts its device workers
first (spawned, never forked after gRPC starts), then serves, then registers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from echelon.audit.policy import Policy
from echelon.audit.record import Role
from echelon.declaration import RunDeclaration
from echelon.device.pool import DevicePool, PoolError
from echelon.policy import ExportPolicy
from echelon.staleness import StalenessConfig
from echelon.tomlconfig import ConfigFileError, build
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig
from echelon.training.tokenizer import TokenizerConfig
from echelon_proto.boundary.v1 import boundary_pb2_grpc
from echelon_proto.coordinator.v1 import coordinator_pb2
from services.common.bootstrap import (
    audited_peer,
    common_arguments,
    common_config,
    load_tables,
    watch_audit_log,
)
from services.common.identity import load_or_create_identity
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import start_server, wait_for_signal

from .coordinator_link import CoordinatorLink, RegistrationRefused
from .runtime import BoundaryRuntime
from .secure import SecureAggregationSession
from .servicer import BoundaryAgentServicer
from .training import (
    DevicesConfig,
    PoolTrainer,
    TrainingSetup,
    device_security,
    model_facts,
    start_pool,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    boundary: str
    coordinator: str = "127.0.0.1:50060"
    advertise_host: str = "127.0.0.1"  # host the coordinator uses to reach this agent
    advertise_address: str = ""  # host:port to register instead (e.g. a proxy in front)
    listen_port: int = -1  # >= 0 overrides [server].port (a launcher that picked the port)
    heartbeat_s: float = 5.0
    register_retry_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.boundary:
            raise ValueError("[agent].boundary: want the organization's id, e.g. 'org-a'")
        if not self.heartbeat_s > 0:
            raise ValueError(f"[agent].heartbeat_s: got {self.heartbeat_s}, want > 0")


def _paths(table: dict[str, Any], key: str, base: Path) -> dict[str, Any]:
    out = dict(table)
    if key in out:
        value = out[key]
        out[key] = tuple(base / p for p in value) if isinstance(value, list) else base / value
    return out


def load_setup(tables: dict[str, Any], base: Path) -> TrainingSetup:
    data = build(DataConfig, _paths(tables.get("data", {}), "files", base), "data")
    tok = _paths(_paths(tables.get("tokenizer", {}), "files", base), "model_dir", base)
    model = dict(tables.get("model", {}))
    if model.get("source", "tiny") != "tiny":
        model["source"] = str(base / model["source"])
    return TrainingSetup(
        devices=build(DevicesConfig, tables.get("devices"), "devices"),
        data=data,
        tokenizer=build(TokenizerConfig, tok, "tokenizer"),
        model=build(ModelConfig, model, "model"),
        lora=build(LoraConfig, tables.get("lora"), "lora"),
        inner=build(InnerConfig, tables.get("inner"), "inner"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echelon-boundary-agent", description=__doc__)
    common_arguments(parser)
    parser.add_argument("--boundary", help="organization id (overrides [agent].boundary)")
    parser.add_argument("--coordinator", help="host:port of the coordinator")
    args = parser.parse_args(argv)
    try:
        tables = load_tables(args)
        common = common_config(tables, args)
        agent_table = dict(tables.get("agent", {}))
        for key in ("boundary", "coordinator"):
            if getattr(args, key):
                agent_table[key] = getattr(args, key)
        agent = build(AgentConfig, agent_table, "agent")
        base = args.config.parent if args.config else Path.cwd()
        setup = load_setup(tables, base)
        export = build(ExportPolicy, tables.get("policy"), "policy")
    except (ConfigFileError, ValueError) as exc:
        print(f"echelon-boundary-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(f"agent/{agent.boundary}", common.log_level)
    structlog.contextvars.bind_contextvars(boundary=agent.boundary)
    data_dir = common.data_dir
    facts = model_facts(setup, data_dir)
    identity = load_or_create_identity(agent.boundary, data_dir / "identity")
    # The gate's policy is tightened to the run's declared one after registration.
    audit, audit_channel = audited_peer(
        agent.boundary, Role.BOUNDARY, identity, Policy(k_min=export.k_min), common.audit
    )
    trainer = PoolTrainer(setup.inner)
    runtime = BoundaryRuntime(
        boundary=agent.boundary,
        theta0=facts.theta0,
        trainer=trainer,
        policy=export,
        staleness=StalenessConfig(),
        on_dropped=audit.dropped,
    )
    secure = SecureAggregationSession(agent.boundary, identity.key)
    layout_digest = bytes.fromhex(facts.layout.digest())
    servicer = BoundaryAgentServicer(
        runtime, audit, secure, layout_digest, workers_alive=trainer.alive_workers
    )
    server_config = common.server
    if agent.listen_port >= 0:
        server_config = dataclasses.replace(server_config, port=agent.listen_port)
    running = start_server(
        server_config,
        lambda server: boundary_pb2_grpc.add_BoundaryAgentServicer_to_server(servicer, server),
        ["echelon.boundary.v1.BoundaryAgent"],
    )
    metrics_port = start_metrics(common.metrics_host, common.metrics_port)
    link = CoordinatorLink(agent.coordinator, audit)
    stop = threading.Event()
    pools: list[DevicePool] = []

    def shutdown() -> None:
        stop.set()
        link.close()
        for pool in pools:
            pool.close()
        audit_channel.close()

    try:
        info = link.register(
            coordinator_pb2.RegisterRequest(
                boundary=agent.boundary,
                address=agent.advertise_address or f"{agent.advertise_host}:{running.port}",
                identity_key=identity.public_key,
                devices=setup.devices.workers,
                layout_digest=layout_digest,
                base_model_digest=facts.base_digest,
                tokenizer_digest=facts.tokenizer_digest,
                dim=facts.layout.numel,
            ),
            agent.register_retry_s,
        )
    except (RegistrationRefused, TimeoutError) as exc:
        log.error("registration_failed", error=str(exc))
        running.stop(0)
        shutdown()
        return 1
    declaration = info.declaration
    runtime.set_run(
        declaration.staleness,
        export_policy(declaration, export),
        delay_aware=declaration.delay_aware,
    )
    audit.adopt(declaration.policy())
    security = device_security(declaration, export.k_min, setup.devices.workers)
    try:
        pools.append(start_pool(setup, facts, data_dir, security))
    except PoolError as exc:
        log.error("device_pool_failed", error=str(exc))
        running.stop(0)
        shutdown()
        return 1
    trainer.attach(pools[0])
    write_port_file(args.port_file, grpc=running.port, metrics=metrics_port)
    log.info(
        "agent_ready",
        port=running.port,
        metrics_port=metrics_port,
        run_id=declaration.run_id,
        workers=trainer.alive_workers(),
        dim=facts.layout.numel,
    )
    link.heartbeats(agent.boundary, lambda: runtime.held_version, agent.heartbeat_s, stop)
    watch_audit_log(common, audit, audit_channel, stop)
    wait_for_signal(running, shutdown, common.server.grace_s)
    return 0


def export_policy(declaration: RunDeclaration, own: ExportPolicy) -> ExportPolicy:
    """The stricter of the boundary's own export policy and the run's declared k_min."""
    return ExportPolicy(k_min=max(declaration.secagg.k_min, own.k_min), clip_norm=own.clip_norm)


if __name__ == "__main__":
    sys.exit(main())
