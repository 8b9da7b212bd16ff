"""How a service talks: mTLS from its party's kit, or plaintext when told `insecure`.

One `Transport` per process, made by `load_transport` from `[service]`: it gives the
server credentials, dials other parties (checking the server's certificate against the
manifest's identity of the party meant, whatever address is dialled), resolves the peer of
an incoming call to its manifest party, and holds the party's keys. Plaintext is never a
fallback: `ServiceConfig.require_transport` refuses a service with neither a kit nor
`insecure = true`, and an insecure transport logs a warning and registers itself as
insecure on the audit log (`KeyRegistration.transport`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import structlog

from echelon.audit.record import TRANSPORT_INSECURE, TRANSPORT_MTLS
from echelon.trust.errors import TrustError
from echelon.trust.kit import Kit, load_kit, write_file
from echelon.trust.manifest import FederationManifest, Party, PartyRole, SignedManifest
from echelon.trust.pki import load_ed25519_public

from .settings import ServiceConfig
from .tls import authorize_peer, secure_channel, server_credentials

log = structlog.get_logger(__name__)


class TransportError(Exception):
    """The kit cannot be used by this service; the message says what is wrong."""


@dataclass(frozen=True)
class Transport:
    """mTLS with `kit`, or plaintext (kit None)."""

    kit: Kit | None

    @property
    def secure(self) -> bool:
        return self.kit is not None

    @property
    def name(self) -> str:
        """What the party's audit registration says of its transport."""
        return TRANSPORT_MTLS if self.kit is not None else TRANSPORT_INSECURE

    @property
    def manifest(self) -> FederationManifest | None:
        return None if self.kit is None else self.kit.manifest

    @property
    def run_id(self) -> str:
        return "" if self.kit is None else self.kit.manifest.run_id

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return None if self.kit is None else server_credentials(self.kit)

    def dial(
        self, target: str, role: PartyRole, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        """A channel to the manifest's party of `role` (the coordinator, the audit log) at
        `target`; plaintext without a kit."""
        if self.kit is None:
            return grpc.insecure_channel(target, options=list(options))
        return secure_channel(target, self.kit, self.party_of(role).party_id, options)

    def party_of(self, role: PartyRole) -> Party:
        """The one party of `role` (coordinator, audit log) in the manifest."""
        assert self.kit is not None
        parties = self.kit.manifest.with_role(role)
        if len(parties) != 1:
            raise TransportError(f"manifest: {len(parties)} parties of role {role}, want one")
        return parties[0]

    def authorize(
        self, context: grpc.ServicerContext, roles: Collection[PartyRole] | None = None
    ) -> Party | None:
        """The calling party (None on plaintext, where no peer can be known); a peer that
        is no manifest party, or not of `roles`, ends the call (UNAUTHENTICATED or
        PERMISSION_DENIED with a message that says why), and is logged."""
        if self.kit is None:
            return None
        try:
            return authorize_peer(context, self.kit.manifest, roles)
        except Exception:
            log.warning("peer_refused", peer=context.peer(), roles=sorted(map(str, roles or ())))
            raise


def load_transport(common: ServiceConfig, party: str, role: PartyRole) -> Transport:
    """The service's transport from `[service]`: its kit, which must be the kit of `party`
    with `role` and verify against the configured root (or the kit's root.pub). Raises
    TransportError saying what is wrong (also when there is neither a kit nor an explicit
    `insecure = true`); an insecure transport is logged as a warning."""
    try:
        common.require_transport()
    except ValueError as exc:
        raise TransportError(str(exc)) from None
    if not common.kit:
        log.warning(
            "transport_insecure",
            party=party,
            detail="plaintext: no peer is authenticated; the audit log records it",
        )
        return Transport(kit=None)
    root: bytes | None = None
    if not common.root_key:
        log.warning(
            "root_from_kit",
            detail="no [service].root_key: the manifest is checked against the kit's own "
            "root.pub; give the root received out of band",
        )
    try:
        if common.root_key:
            path = Path(common.root_key)
            root = load_ed25519_public(path.read_bytes(), str(path))
        kit = load_kit(Path(common.kit), root_key=root, now=datetime.now(UTC))
    except (OSError, ValueError, TrustError) as exc:
        raise TransportError(f"[service].kit {common.kit}: {exc}") from None
    if kit.party.party_id != party or kit.party.role != role:
        raise TransportError(
            f"[service].kit {common.kit}: is the kit of {kit.party.party_id} "
            f"({kit.party.role}), want {party}'s ({role})"
        )
    _check_version(kit.signed_manifest, Path(common.data_dir) / LAST_MANIFEST)
    log.info(
        "transport_mtls",
        party=party,
        run_id=kit.manifest.run_id,
        manifest_version=kit.manifest.version,
    )
    return Transport(kit=kit)


LAST_MANIFEST = "manifest.json"  # in the data dir: the last manifest this service ran under


def _check_version(signed: SignedManifest, last: Path) -> None:
    """Manifest versions only go up: a kit older than the manifest this service last ran
    under is refused (a rolled-back kit would readmit a revoked party), a newer one must
    be its successor (same run, same root); the newest is kept in the data dir."""
    if last.exists():
        try:
            previous = SignedManifest.from_bytes(last.read_bytes())
        except TrustError as exc:
            raise TransportError(f"{last}: {exc}") from None
        if signed.version < previous.version or (
            signed.version == previous.version and signed.to_bytes() != previous.to_bytes()
        ):
            raise TransportError(
                f"kit manifest: version {signed.version} of run {signed.run_id}, but this "
                f"service last ran under version {previous.version} ({last}); want that "
                "version or a later one"
            )
        if signed.version > previous.version:
            try:
                signed.check_successor(previous)
            except TrustError as exc:
                raise TransportError(f"kit manifest: not a successor of {last}: {exc}") from None
            log.info("manifest_rotated", previous=previous.version, version=signed.version)
    last.parent.mkdir(parents=True, exist_ok=True)
    write_file(last, signed.to_bytes(), private=False)
