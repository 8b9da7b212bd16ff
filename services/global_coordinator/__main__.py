"""Runs the global coordinator: `python -m services.global_coordinator --config FILE.toml`.

TOML tables: [service] (host, port, metrics_port, data_dir, audit_log, audit_key, ...),
[coordinator] (run_id, windows, token_unit, buffered, prekey, ...), [inner], [window],
[outer], [secagg], [staleness], [controller], [stats]. Settings: defaults < the file <
`ECHELON_*` environment < flags (docs/configuration.md). Agents dial in
(`Coordinator.Session`); the coordinator connects to nothing but the audit log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from echelon.audit.record import LOG_PARTY, PayloadType, Role, RunConfig
from echelon.declaration import ModelIdentity
from echelon.protocol import CoordinatorCore
from echelon.tomlconfig import ConfigFileError
from echelon.trust.manifest import FederationManifest, PartyRole
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from services.common.audited import AuditedPeer
from services.common.bootstrap import (
    audited_peer,
    log_verifier_key,
    record_manifest,
    watch_audit_log,
)
from services.common.identity import load_or_create_identity
from services.common.native import single_threaded_blas
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import start_server, wait_for_signal
from services.common.settings import COORDINATOR, Resolved, add_arguments, resolve
from services.common.transport import TransportError, load_transport

from .config import CoordinatorConfig
from .servicer import CoordinatorServicer
from .session import CoordinatorSessions
from .store import CoordinatorStore, restore_state

PARTY = "coordinator"
_RECORDED = "run_config_sha256"
_MANIFEST = "manifest_version"  # the last manifest version recorded on the audit log
log = structlog.get_logger(__name__)


def load_config(resolved: Resolved) -> CoordinatorConfig:
    """[coordinator] and the components' own tables ([window], [outer], ...)."""
    tables = resolved.tables
    body: dict[str, Any] = dict(tables.get("coordinator", {}))
    hints = typing.get_type_hints(CoordinatorConfig)
    for name in ("inner", "window", "outer", "secagg", "staleness", "controller", "stats"):
        if name in tables:
            body[name] = resolved.build(hints[name], tables[name], name)
    return resolved.build(CoordinatorConfig, body, "coordinator")


def core_factory(
    config: CoordinatorConfig,
    store: CoordinatorStore,
    audit: AuditedPeer,
    manifest: FederationManifest | None = None,
) -> Callable[[ModelIdentity], tuple[CoordinatorCore, bytes]]:
    """Builds the run's core once the model is pinned, recording the declaration once.
    With a manifest, the declaration is the manifest's (the configuration's run tables
    are then not used: every parameter comes from the manifest)."""

    def make(model: ModelIdentity) -> tuple[CoordinatorCore, bytes]:
        declaration = config.declaration(model) if manifest is None else manifest.declaration
        if manifest is not None and config.declaration(model) != declaration:
            log.warning(
                "run_tables_ignored",
                detail="the run's parameters come from the manifest, not from this file",
                manifest_version=manifest.version,
            )
        body = declaration.to_canonical_bytes()
        digest = hashlib.sha256(body).hexdigest()
        recorded = store.get_meta(_RECORDED)
        if recorded is None:
            audit.gate.send(
                PayloadType.RUN_CONFIG, LOG_PARTY, 0, body, RunConfig(config=body), lambda: None
            )
            store.set_meta(_RECORDED, digest)
        elif recorded != digest:
            log.warning("run_config_changed", recorded=recorded, now=digest)
        protocol = replace(
            declaration.protocol(),
            retry_s=config.abort_backoff_s,
            join_grace_s=config.join_grace_s,
        )
        core = CoordinatorCore(
            protocol, dim=model.dim, identities={}, state=restore_state(store, model.dim)
        )
        return core, body

    return make


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COORDINATOR.prog, description=__doc__)
    add_arguments(parser, COORDINATOR)
    args = parser.parse_args(argv)
    try:
        resolved = resolve(COORDINATOR, args, os.environ)
        common = resolved.service()
        config = load_config(resolved)
    except ConfigFileError as exc:
        print(f"{COORDINATOR.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(resolved.render(common, coordinator=config), end="")
        return 0
    configure_logging("coordinator", common.log_level)
    single_threaded_blas()  # numpy's BLAS helpers would spin on the workers' cores
    try:
        transport = load_transport(common, PARTY, PartyRole.COORDINATOR)
    except TransportError as exc:
        print(f"{COORDINATOR.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    manifest = transport.manifest
    identity = load_or_create_identity(PARTY, common.data_dir / "identity", transport.kit)
    policy = config.policy() if manifest is None else manifest.declaration.policy()
    audit, audit_channel = audited_peer(
        PARTY,
        Role.COORDINATOR,
        identity,
        policy,
        common.audit_log,
        transport=transport,
        log_key=log_verifier_key(common, transport),
    )
    store = CoordinatorStore(common.data_dir / "state")
    if transport.kit is not None:  # each manifest version the run goes through, on the log
        recorded = record_manifest(
            audit, transport.kit.signed_manifest, int(store.get_meta(_MANIFEST) or 0)
        )
        store.set_meta(_MANIFEST, str(recorded))
    sessions = CoordinatorSessions(
        core_factory(config, store, audit, manifest),
        run_id=config.run_id,
        store=store,
        audit=audit,
        manifest=manifest,
    )
    servicer = CoordinatorServicer(sessions=sessions, store=store, transport=transport, audit=audit)
    running = start_server(
        common.server,
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
        ["echelon.coordinator.v1.Coordinator"],
        credentials=transport.server_credentials(),
    )
    metrics_port = start_metrics(common.metrics_host, common.metrics_port)
    write_port_file(args.port_file, grpc=running.port, metrics=metrics_port)
    log.info(
        "coordinator_ready", port=running.port, metrics_port=metrics_port, run_id=sessions.run_id
    )
    stop = threading.Event()
    watch_audit_log(common, audit, audit_channel, stop, transport)

    def done() -> bool:
        return stop.is_set() or (sessions.pinned and sessions.core.done)

    def finish() -> None:
        sessions.wait(done, float("inf"))
        if not stop.is_set():
            log.info("run_complete", windows=sessions.core.committed, version=sessions.core.version)

    threading.Thread(target=finish, name="run-complete", daemon=True).start()

    def shutdown() -> None:
        stop.set()
        sessions.stop()
        audit_channel.close()
        store.close()

    wait_for_signal(running, shutdown, common.server.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
