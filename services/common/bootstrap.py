"""Start-up steps every service shares: config tables, identity, audit gate, metrics."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from echelon.audit.gate import AuditSink, EgressGate, wall_clock_ms
from echelon.audit.policy import Policy
from echelon.audit.record import LOG_PARTY, KeyRegistration, PayloadType, Role
from echelon.tomlconfig import build, load_toml

from .audited import AuditedPeer
from .identity import Identity
from .pipelined import PipelinedSink
from .server import ServerConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """Tables every service reads: where it listens, its metrics, logs, data and audit log."""

    server: ServerConfig = field(default_factory=ServerConfig)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: ephemeral; -1: off
    log_level: str = "info"
    data_dir: Path = Path("var")
    audit: str = "127.0.0.1:50070"  # host:port of the audit log service
    audit_key: str = ""  # the log's verifier key (file or text); "" = do not witness
    witness_s: float = 10.0  # how often to check the log's signed tree head


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--host", help="listen host (overrides [server].host)")
    parser.add_argument("--port", type=int, help="listen port; 0 = ephemeral")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port; 0 = ephemeral, -1 = off")
    parser.add_argument("--data-dir", type=Path, help="durable state directory")
    parser.add_argument("--audit", help="host:port of the audit log service")
    parser.add_argument("--audit-key", help="the audit log's verifier key (file or text)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--port-file", type=Path, help="write the bound ports here as JSON")


def load_tables(args: argparse.Namespace) -> dict[str, Any]:
    return load_toml(args.config) if args.config else {}


def common_config(tables: dict[str, Any], args: argparse.Namespace) -> CommonConfig:
    """[server], [service] tables overlaid with flags."""
    server = dict(tables.get("server", {}))
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    service = dict(tables.get("service", {}))
    for key in ("metrics_port", "data_dir", "audit", "log_level", "audit_key"):
        value = getattr(args, key)
        if value is not None:
            service[key] = str(value) if isinstance(value, Path) else value
    if "data_dir" in service:
        service["data_dir"] = Path(service["data_dir"])
    config = build(CommonConfig, {**service, "server": server}, "service")
    return config


def audited_peer(
    party: str,
    role: Role,
    identity: Identity,
    policy: Policy,
    audit_address: str,
    *,
    pipelined: bool = False,
) -> tuple[AuditedPeer, grpc.Channel]:
    """Connects to the audit log, registers the party's key (one synchronous append),
    returns its audited wire. `pipelined` (a party across a wide-area link from the log:
    a boundary agent) appends its later records in the background under the invariant of
    `services.common.pipelined`."""
    from services.audit_log.client import AuditClient

    channel = grpc.insecure_channel(audit_address)
    client = AuditClient(channel)
    halt: list[Callable[[str], None]] = []
    pipeline = (
        PipelinedSink(client, on_failure=lambda reason: halt[0](reason)) if pipelined else None
    )

    def make_gate(with_policy: Policy, sink: AuditSink | None = None) -> EgressGate:
        return EgressGate(
            party=party,
            role=role,
            signer=identity.signer,
            policy=with_policy,
            sink=sink or pipeline or client,
            clock=wall_clock_ms,
        )

    make_gate(policy, client).send(
        PayloadType.KEY_REGISTRATION,
        LOG_PARTY,
        0,
        identity.public_key,
        KeyRegistration(role=role, signing_key=identity.public_key),
        lambda: None,
    )
    peer = AuditedPeer(make_gate(policy), make_gate, pipeline)
    halt.append(peer.halt)
    return peer, channel


def watch_audit_log(
    common: CommonConfig, peer: AuditedPeer, channel: grpc.Channel, stop: threading.Event
) -> None:
    """Starts witnessing the log's tree heads when the log's key is configured."""
    from echelon.audit.checkpoint import load_verifier

    from .witnessing import LogWatch

    if not common.audit_key:
        log.warning("audit_log_not_witnessed", reason="no [service].audit_key configured")
        return
    watch = LogWatch(
        peer=peer,
        verifier=load_verifier(common.audit_key),
        state_file=common.data_dir / "identity" / "witness.json",
        channel=channel,
    )
    watch.start(common.witness_s, stop)
