"""Runs a boundary agent: `python -m services.boundary_agent --config FILE.toml`.

TOML tables: [service] (host, port, metrics_port, data_dir, coordinator, audit_log, ...),
[agent] (boundary), [devices], [data], [tokenizer], [model], [lora], [inner], [policy].
Settings: defaults < the file < `ECHELON_*` environment < flags (docs/configuration.md).
The agent dials out to the coordinator (one window session) and accepts no connection
from outside its organization: its gRPC server is a status and health endpoint for its
own operators, bound to loopback by default, as its metrics are. It joins windows once
its device workers (spawned processes) are up.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon import tomlconfig
from echelon.audit.errors import AuditError
from echelon.audit.policy import Policy
from echelon.audit.record import ManifestAttributes, PayloadType, Role
from echelon.declaration import ModelIdentity, RunDeclaration
from echelon.device.pool import DevicePool, PoolError
from echelon.floor import LocalFloor, declaration_shortfalls
from echelon.policy import ExportPolicy
from echelon.protocol import COORDINATOR, BoundaryCore
from echelon.tomlconfig import Builder, ConfigFileError
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig
from echelon.training.tokenizer import TokenizerConfig
from echelon.trust.manifest import FederationManifest, PartyRole, SignedManifest
from echelon_proto.boundary.v1 import boundary_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2
from services.common.audited import AuditedPeer
from services.common.bootstrap import audited_peer, log_verifier_key, watch_audit_log
from services.common.identity import load_or_create_identity
from services.common.native import single_threaded_blas
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import start_server, wait_for_signal
from services.common.settings import BOUNDARY_AGENT, add_arguments, resolve
from services.common.transport import TransportError, load_transport

from . import metrics
from .config import AgentConfig
from .session import AgentSession, Backoff, Hello, session_trust
from .state import load_state, save_state
from .status import AgentStatusServicer, watch_attachment
from .training import (
    DevicesConfig,
    PoolTrainer,
    TrainingSetup,
    device_security,
    model_facts,
    start_pool,
)

log = structlog.get_logger(__name__)


def _paths(table: dict[str, Any], key: str, base: Path) -> dict[str, Any]:
    out = dict(table)
    if key in out:
        value = out[key]
        out[key] = tuple(base / p for p in value) if isinstance(value, list) else base / value
    return out


def load_setup(
    tables: dict[str, Any], base: Path, build: Builder = tomlconfig.build
) -> TrainingSetup:
    """The training tables; relative paths in them are relative to `base` (the file's
    directory). `build` is `Resolved.build` in `main()`, to name a value's source."""
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
    parser = argparse.ArgumentParser(prog=BOUNDARY_AGENT.prog, description=__doc__)
    add_arguments(parser, BOUNDARY_AGENT)
    parser.add_argument(
        "--print-model",
        action="store_true",
        help="print this boundary's model identity as LAYOUT:BASE:TOKENIZER:DIM (what "
        "`echelon provision --model` takes), then exit",
    )
    args = parser.parse_args(argv)
    try:
        resolved = resolve(BOUNDARY_AGENT, args, os.environ)
        common = resolved.service()
        agent = resolved.build(AgentConfig, resolved.tables.get("agent"), "agent")
        setup = load_setup(resolved.tables, resolved.base, resolved.build)
        export = resolved.build(ExportPolicy, resolved.tables.get("policy"), "policy")
        floor = resolved.build(LocalFloor, resolved.tables.get("floor"), "floor")
    except ConfigFileError as exc:
        print(f"{BOUNDARY_AGENT.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(resolved.render(common, agent=agent), end="")
        return 0
    configure_logging(f"agent/{agent.boundary}", common.log_level)
    single_threaded_blas()  # numpy's BLAS helpers would spin on the workers' cores
    structlog.contextvars.bind_contextvars(boundary=agent.boundary)
    if args.print_model:
        facts = model_facts(setup, common.data_dir)
        layout = facts.layout.digest()
        print(
            f"{layout}:{facts.base_digest.hex()}:{facts.tokenizer_digest.hex()}:"
            f"{facts.layout.numel}"
        )
        return 0
    try:
        transport = load_transport(common, agent.boundary, PartyRole.BOUNDARY)
    except TransportError as exc:
        print(f"{BOUNDARY_AGENT.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    manifest = transport.manifest
    data_dir = common.data_dir
    facts = model_facts(setup, data_dir)
    identity = load_or_create_identity(agent.boundary, data_dir / "identity", transport.kit)
    # The gate's policy is tightened to the run's declared one once the coordinator says it.
    # Pipelined: the log is across the wide-area link, off the window's critical path.
    audit, audit_channel = audited_peer(
        agent.boundary,
        Role.BOUNDARY,
        identity,
        Policy(k_min=export.k_min),
        common.audit_log,
        transport=transport,
        pipelined=True,
        log_key=log_verifier_key(common, transport),
    )
    if transport.kit is not None:
        short = declaration_shortfalls(transport.kit.manifest.declaration, floor)
        if short:  # the manifest itself is weaker than this organization's floor
            reason = "manifest below this organization's floor: " + "; ".join(short)
            log.error("run_refused", reason=reason)
            refuse_manifest(audit, transport.kit.signed_manifest, reason)
            audit.close()
            audit_channel.close()
            return 1
    model = ModelIdentity(
        bytes.fromhex(facts.layout.digest()),
        facts.base_digest,
        facts.tokenizer_digest,
        facts.layout.numel,
    )
    trainer = PoolTrainer(setup.inner, facts.theta0)
    state_dir = data_dir / "state"
    pools: list[DevicePool] = []
    failed = threading.Event()
    stop = threading.Event()
    session: AgentSession | None = None

    def fail() -> None:
        """The devices cannot start: the refusal watcher stops the agent now."""
        failed.set()
        if session is not None:
            session.changed()

    def start_devices(declaration: RunDeclaration) -> None:
        security = device_security(declaration, export.k_min, setup.devices.workers)
        need = max(security.k_min, 2)
        if security.secure is not None and setup.devices.workers < need:
            # Every window would be refused inside the boundary (level 1 sums at least
            # k_min devices): say so once and stop, rather than decline window after window.
            log.error(
                "devices_below_k_min",
                workers=setup.devices.workers,
                want=need,
                detail="[devices].workers is below the run's k_min with level 1 on: this "
                "boundary could never contribute; run more workers",
            )
            fail()
            return
        try:
            pools.append(start_pool(setup, facts, data_dir, security))
        except PoolError as exc:
            log.error("device_pool_failed", error=str(exc))
            fail()
            return
        trainer.attach(pools[0])
        log.info("devices_ready", workers=trainer.alive_workers())
        assert session is not None
        session.mark_ready()
        evaluate_at_end(declaration.protocol().windows)

    def evaluate_at_end(windows: int) -> None:
        """Once the run's last version is held (a run of `windows` windows), its held-out
        loss on this boundary's validation text (the boundary's own; never sent)."""
        agent_session = session
        assert agent_session is not None
        if windows <= 0:
            return
        agent_session.wait(
            lambda: stop.is_set() or agent_session.status().held_version >= windows,
            float("inf"),
        )
        held = agent_session.held_global()
        if stop.is_set() or held is None:
            return
        try:
            trainer.evaluate_final(*held)
        except (PoolError, RuntimeError) as exc:
            log.warning("final_evaluation_failed", version=held[0], error=str(exc))

    def make_core(welcome: session_pb2.Welcome) -> BoundaryCore:
        declaration = accept_declaration(bytes(welcome.run_config), model, agent.boundary, manifest)
        short = declaration_shortfalls(declaration, floor)
        if short:
            raise ValueError(
                f"run {declaration.run_id!r} is below this organization's floor: "
                + "; ".join(short)
            )
        audit.adopt(declaration.policy())
        protocol = declaration.protocol()
        protocol = dataclasses.replace(
            protocol,
            policy=export_policy(declaration, export),
        )
        threading.Thread(
            target=start_devices, args=(declaration,), name="devices", daemon=True
        ).start()
        try:
            saved = load_state(state_dir)
        except (OSError, ValueError, KeyError) as exc:
            log.error("state_unreadable", path=str(state_dir), error=str(exc))
            saved = None
        if saved is not None:
            log.info(
                "state_resumed",
                version=saved.held_version,
                pending=len(saved.pending),
                lost=saved.lost,
            )
        return BoundaryCore(
            protocol,
            boundary=agent.boundary,
            theta0=facts.theta0,
            identity=identity.key,
            identities={b: Ed25519PublicKey.from_public_bytes(k) for b, k in manifest_keys.items()},
            rounding_seed=secrets.randbits(63),
            state=saved,
            floor=floor,
        )

    trust = session_trust(transport, agent.boundary)
    manifest_keys: dict[str, bytes] = trust["manifest_keys"] or {}
    session = AgentSession(
        make_core,
        address=common.coordinator,
        hello=Hello(
            boundary=agent.boundary,
            identity_key=identity.identity_public,
            devices=setup.devices.workers,
            dim=facts.layout.numel,
            layout_digest=model.layout_digest,
            base_model_digest=model.base_model_digest,
            tokenizer_digest=model.tokenizer_digest,
        ),
        run_id=transport.run_id,
        train=trainer,
        rebase=trainer.rebase,
        audit=audit,
        persist=lambda state: save_state(state_dir, state),
        ready=False,
        backoff=Backoff(max_s=agent.reconnect_max_s),
        **trust,
    )
    status = AgentStatusServicer(agent.boundary, session, trainer.alive_workers, trainer.own_stats)
    running = start_server(
        common.server,
        lambda server: boundary_pb2_grpc.add_BoundaryAgentServicer_to_server(status, server),
        ["echelon.boundary.v1.BoundaryAgent"],
    )
    metrics_port = start_metrics(common.metrics_host, common.metrics_port)
    metrics.watch_status(session.status)
    watch_attachment(lambda: session.status().connected, running.health, stop)

    def shutdown() -> None:
        stop.set()
        assert session is not None
        session.stop()
        for pool in pools:
            pool.close()  # a window in progress fails out of the pool, its workers stopped
        if not session.drain(timeout_s=30.0):
            log.error("training_thread_stuck")
        audit.close()  # what the pipeline still holds reaches the log
        audit_channel.close()

    session.start()
    write_port_file(args.port_file, grpc=running.port, metrics=metrics_port)
    log.info(
        "agent_ready",
        port=running.port,
        metrics_port=metrics_port,
        coordinator=common.coordinator,
        dim=facts.layout.numel,
    )
    watch_audit_log(common, audit, audit_channel, stop, transport)

    def watch_refusal() -> None:
        assert session is not None
        session.wait(lambda: session.log.refused is not None or failed.is_set(), float("inf"))
        log.error(
            "agent_stopping",
            reason=session.log.refused or "devices failed to start (see the error before)",
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_refusal, name="refusal", daemon=True).start()
    wait_for_signal(running, shutdown, common.server.grace_s)
    return 1 if (session.log.refused or failed.is_set()) else 0


def refuse_manifest(audit: AuditedPeer, signed: SignedManifest, reason: str) -> None:
    """The refused manifest and why, on the audit log (a refusal on receipt: the run's
    coordinator stands for the federation that issued it)."""
    try:
        audit.gate.refused_receipt(
            PayloadType.MANIFEST,
            COORDINATOR,
            0,
            signed.to_bytes(),
            ManifestAttributes(version=signed.version),
            reason,
        )
    except AuditError as exc:
        log.error("refusal_not_recorded", reason=reason, error=str(exc))


def accept_declaration(
    body: bytes,
    model: ModelIdentity,
    boundary: str,
    manifest: FederationManifest | None = None,
) -> RunDeclaration:
    """The coordinator's declaration, parsed by the one parser; refused (ValueError) when
    it is for another model than this boundary's, or, with a manifest, is not exactly the
    manifest's (every parameter comes from the manifest, never from the coordinator)."""
    declaration = RunDeclaration.from_canonical_bytes(body)
    if manifest is not None and body != manifest.declaration.to_canonical_bytes():
        raise ValueError(
            f"{boundary}: the coordinator declares a run (sha256 "
            f"{hashlib.sha256(body).hexdigest()[:16]}...) other than the manifest's "
            f"(run {manifest.run_id} version {manifest.version}, sha256 "
            f"{manifest.declaration.digest().hex()[:16]}...)"
        )
    if declaration.model != model:
        raise ValueError(
            f"{boundary}: the run declares model {declaration.model}, this boundary runs {model}"
        )
    return declaration


def export_policy(declaration: RunDeclaration, own: ExportPolicy) -> ExportPolicy:
    """The stricter of the boundary's own export policy and the run's declared one."""
    return ExportPolicy(
        k_min=max(declaration.secagg.k_min, own.k_min),
        clip_norm=min(own.clip_norm, declaration.clip_norm),
    )


if __name__ == "__main__":
    sys.exit(main())
