"""Start-up steps every service shares: the audit gate and witnessing the audit log.

Configuration is read by `services.common.settings`."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import structlog

from echelon.audit.checkpoint import load_verifier
from echelon.audit.gate import AuditSink, EgressGate, wall_clock_ms
from echelon.audit.policy import Policy
from echelon.audit.proofs import ProofChain
from echelon.audit.record import (
    LOG_PARTY,
    KeyRegistration,
    ManifestAttributes,
    PayloadType,
    Role,
)
from echelon.trust.manifest import PartyRole, SignedManifest

from .audited import AuditedPeer
from .identity import Identity
from .pipelined import PipelinedSink
from .settings import ServiceConfig
from .transport import Transport

log = structlog.get_logger(__name__)


def audited_peer(
    party: str,
    role: Role,
    identity: Identity,
    policy: Policy,
    audit_address: str,
    *,
    transport: Transport | None = None,
    pipelined: bool = False,
    log_key: str = "",
) -> tuple[AuditedPeer, grpc.Channel]:
    """Connects to the audit log (mTLS with the party's kit, or plaintext), registers the
    party's key and its transport (one synchronous append), returns its audited wire.
    `pipelined` (a party across a wide-area link from the log: a boundary agent) appends
    its later records in the background under the invariant of `services.common.pipelined`.
    `log_key` (the log's verifier key; `log_verifier_key`): every append is answered with its
    proof, checked before the party's next egress (`echelon.audit.proofs`)."""
    from services.audit_log.client import AuditClient

    transport = transport or Transport(kit=None)  # None: plaintext (in-process tests)
    channel = transport.dial(audit_address, PartyRole.AUDIT_LOG)
    proofs = ProofChain(load_verifier(log_key)) if log_key else None
    if proofs is None:
        log.warning("audit_appends_unproven", party=party, reason="no log key known")
    client = AuditClient(channel, proofs=proofs)
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
        KeyRegistration(role=role, signing_key=identity.public_key, transport=transport.name),
        lambda: None,
    )
    peer = AuditedPeer(make_gate(policy), make_gate, pipeline)
    halt.append(peer.halt)
    client.on_proof_failure = peer.halt  # a record the log did not prove stops all egress
    if proofs is not None:
        from .witnessing import SplitViewCheck

        peer.heads = SplitViewCheck(
            peer=peer, proofs=proofs, verifier=load_verifier(log_key), source=client
        )
    return peer, channel


def log_verifier_key(common: ServiceConfig, transport: Transport) -> str:
    """The audit log's verifier key: `[service].audit_key` when set, else the key the
    manifest names for the audit-log party (with a kit), else "" (not witnessed)."""
    if common.audit_key or transport.manifest is None:
        return common.audit_key
    return transport.manifest.log_verifier_key()


def watch_audit_log(
    common: ServiceConfig,
    peer: AuditedPeer,
    channel: grpc.Channel,
    stop: threading.Event,
    transport: Transport,
) -> None:
    """Starts witnessing the log's tree heads when the log's key is known."""
    from .witnessing import LogWatch

    key = log_verifier_key(common, transport)
    if not key:
        log.warning("audit_log_not_witnessed", reason="no [service].audit_key configured")
        return
    watch = LogWatch(
        peer=peer,
        verifier=load_verifier(key),
        state_file=common.data_dir / "identity" / "witness.json",
        channel=channel,
    )
    watch.start(common.witness_s, stop)


def record_manifest(peer: AuditedPeer, signed: SignedManifest, recorded: int) -> int:
    """Records the run's signed manifest on the audit log (its bytes' SHA-256 and its
    version) when its version is newer than `recorded`, the last one this party recorded;
    returns the version now recorded. A rotation is thereby on the log."""
    if signed.version <= recorded:
        return recorded
    body = signed.to_bytes()
    peer.gate.send(
        PayloadType.MANIFEST,
        LOG_PARTY,
        0,
        body,
        ManifestAttributes(version=signed.version),
        lambda: None,
    )
    log.info("manifest_recorded", run_id=signed.run_id, version=signed.version)
    return signed.version
