"""mTLS for the services: a party's kit as gRPC server credentials (client certificates
required, from the federation CA only) and channel credentials, and the peer of a call
resolved from its certificate to the manifest party it is, or refused with a status.

A peer is a party when its certificate, already chained to the CA by the TLS handshake,
names the party's certificate identity in its SAN and carries the key the manifest pins
(so another certificate for the same name, even from the same CA, is refused).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import grpc
from cryptography import x509

from echelon.trust.errors import CertificateError
from echelon.trust.kit import Kit
from echelon.trust.manifest import FederationManifest, Party, PartyRole
from echelon.trust.pki import certificate_identities, key_sha256, load_certificate

PEER_CERT_KEY = "x509_pem_cert"  # gRPC's auth-context property holding the peer's PEM
TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"


class PeerIdentityError(Exception):
    """A call's peer is not a party it may act as; `code` is the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def server_credentials(kit: Kit) -> grpc.ServerCredentials:
    """TLS with the kit's certificate; every client must present one issued by the kit's CA."""
    return grpc.ssl_server_credentials(
        [(kit.tls_key_pem, kit.certificate_pem)],
        root_certificates=kit.ca_certificate_pem,
        require_client_auth=True,
    )


def channel_credentials(kit: Kit) -> grpc.ChannelCredentials:
    """TLS that trusts only the kit's CA and presents the kit's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=kit.ca_certificate_pem,
        private_key=kit.tls_key_pem,
        certificate_chain=kit.certificate_pem,
    )


def channel_options(kit: Kit, server: str) -> list[tuple[str, str]]:
    """Channel options that make TLS check the server's certificate against the manifest's
    identity of party `server`, whatever address is dialled. Raises ValueError when `server`
    is not a party of the kit's manifest."""
    party = kit.manifest.party(server)
    if party is None:
        ids = [p.party_id for p in kit.manifest.parties]
        raise ValueError(f"server: got {server!r}, want a manifest party, one of {ids}")
    return [(TARGET_NAME_OVERRIDE, party.certificate_identity)]


def secure_channel(
    target: str, kit: Kit, server: str, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """An mTLS channel to `target`, which must present the certificate of party `server`."""
    return grpc.secure_channel(
        target, channel_credentials(kit), options=[*channel_options(kit, server), *options]
    )


def resolve_peer(
    auth_context: Mapping[str, Sequence[bytes]], manifest: FederationManifest
) -> Party:
    """The manifest party whose certificate the peer presented. Raises PeerIdentityError:
    UNAUTHENTICATED without a certificate (a plaintext peer), PERMISSION_DENIED when the
    certificate names no party, names several, or does not carry the pinned key."""
    pems = auth_context.get(PEER_CERT_KEY) or []
    if len(pems) != 1:
        raise PeerIdentityError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"peer: got {len(pems)} certificates, want one client certificate (mTLS)",
        )
    try:
        certificate = load_certificate(pems[0], "peer certificate")
    except CertificateError as exc:
        raise PeerIdentityError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
    return party_of_certificate(certificate, manifest)


def party_of_certificate(certificate: x509.Certificate, manifest: FederationManifest) -> Party:
    """The party a (CA-verified) certificate identifies; raises PeerIdentityError."""
    names = certificate_identities(certificate)
    parties = [p for n in names if (p := manifest.party_by_certificate_identity(n))]
    if len(parties) != 1:
        raise PeerIdentityError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"peer certificate: names {list(names)}, want the certificate identity of exactly "
            f"one party of run {manifest.run_id} version {manifest.version}",
        )
    party = parties[0]
    if key_sha256(certificate) != party.tls_key_sha256:
        raise PeerIdentityError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"peer certificate: names {party.party_id} but its key is not the one the manifest "
            f"pins for {party.party_id} (sha256 {party.tls_key_sha256.hex()[:16]}...)",
        )
    return party


def authorize_peer(
    context: grpc.ServicerContext,
    manifest: FederationManifest,
    roles: Collection[PartyRole] | None = None,
) -> Party:
    """The calling party, resolved by `resolve_peer`; a peer that is no party, or not of one
    of `roles` (None: any role), ends the call with the refusal's status and message."""
    # grpc-stubs types auth_context() as Mapping[str, bytes]; each value is a list of bytes.
    auth: Mapping[str, Sequence[bytes]] = _auth_context(context)
    try:
        party = resolve_peer(auth, manifest)
    except PeerIdentityError as exc:
        context.abort(exc.code, exc.message)
    if roles is not None and party.role not in roles:
        wanted = sorted(str(r) for r in roles)
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"peer {party.party_id}: role {party.role}, want one of {wanted} for this call",
        )
    return party


def _auth_context(context: grpc.ServicerContext) -> Mapping[str, Sequence[bytes]]:
    raw: Mapping[str, Any] = context.auth_context()
    return {key: list(value) for key, value in raw.items()}
