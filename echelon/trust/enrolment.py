"""An organization's own keys and the public enrolment it sends to the federation's
provisioner: a certificate request and its Ed25519 public keys, each key proving possession
by a signature, so that the organization's private keys never leave it.

Layout (docs/trust.md): canonical JSON with the fields of `PublicEnrolment`; the audit key
and the identity key each sign `ENROLMENT_CONTEXT` + the canonical JSON of the statement
(`party_id`, `certificate_request`, `audit_key`, `identity_key`); the request is signed by
the TLS key it certifies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.audit.record import PARTY_RE, canonical_json

from .errors import CertificateError, EnrolmentError
from .pki import (
    certificate_request,
    check_request,
    ed25519_raw_public,
    generate_tls_key,
    load_request,
    request_pem,
)

ENROLMENT_SCHEMA_VERSION = 1
ENROLMENT_CONTEXT = b"echelon/enrolment/v1\x00"
MAX_ENROLMENT_BYTES = 64 * 1024
_FIELDS = (
    "schema_version",
    "party_id",
    "certificate_request",
    "audit_key",
    "identity_key",
    "audit_signature",
    "identity_signature",
)


@dataclass(frozen=True)
class PartyKeys:
    """A party's private keys: TLS (ECDSA P-256), audit signing and identity (Ed25519)."""

    tls_key: ec.EllipticCurvePrivateKey
    audit_key: Ed25519PrivateKey
    identity_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> PartyKeys:
        return cls(
            tls_key=generate_tls_key(),
            audit_key=Ed25519PrivateKey.generate(),
            identity_key=Ed25519PrivateKey.generate(),
        )

    def enrolment(self, party_id: str, certificate_identity: str) -> PublicEnrolment:
        """The public material to send: a CSR for `certificate_identity` and both public
        keys, each signing the statement."""
        request = request_pem(certificate_request(self.tls_key, certificate_identity))
        audit = ed25519_raw_public(self.audit_key)
        identity = ed25519_raw_public(self.identity_key)
        statement = _statement(party_id, request, audit, identity)
        return PublicEnrolment(
            party_id=party_id,
            certificate_request=request,
            audit_key=audit,
            identity_key=identity,
            audit_signature=self.audit_key.sign(statement),
            identity_signature=self.identity_key.sign(statement),
        )


@dataclass(frozen=True, kw_only=True)
class PublicEnrolment:
    """What an organization sends: nothing in it is secret. `verify` (and `from_bytes`,
    which calls it) checks that whoever made it holds all three private keys."""

    party_id: str
    certificate_request: bytes  # PEM
    audit_key: bytes
    identity_key: bytes
    audit_signature: bytes
    identity_signature: bytes

    @property
    def request(self) -> x509.CertificateSigningRequest:
        return load_request(self.certificate_request, "enrolment.certificate_request")

    @property
    def certificate_identity(self) -> str:
        """The one SAN DNS name the request asks for."""
        names = certificate_identities_of_request(self.request)
        if len(names) != 1:
            raise EnrolmentError(
                f"enrolment.certificate_request: got SAN names {names}, want exactly one"
            )
        return names[0]

    def verify(self) -> None:
        """Raises EnrolmentError unless the request and both key signatures verify."""
        if not PARTY_RE.fullmatch(self.party_id):
            raise EnrolmentError(
                f"enrolment.party_id: got {self.party_id!r}, want [a-z0-9][a-z0-9._-]{{0,62}}"
            )
        try:
            check_request(self.request, self.certificate_identity)
        except CertificateError as exc:
            raise EnrolmentError(f"enrolment.{exc}") from None
        statement = _statement(
            self.party_id, self.certificate_request, self.audit_key, self.identity_key
        )
        for name, key, signature in (
            ("audit", self.audit_key, self.audit_signature),
            ("identity", self.identity_key, self.identity_signature),
        ):
            try:
                Ed25519PublicKey.from_public_bytes(key).verify(signature, statement)
            except ValueError:
                raise EnrolmentError(
                    f"enrolment.{name}_key: got {len(key)} bytes, want a 32-byte Ed25519 key"
                ) from None
            except InvalidSignature:
                raise EnrolmentError(
                    f"enrolment.{name}_signature: does not verify under {name}_key, want the "
                    "key's signature over the statement (proof of possession)"
                ) from None

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "schema_version": ENROLMENT_SCHEMA_VERSION,
                "party_id": self.party_id,
                "certificate_request": self.certificate_request.decode("ascii"),
                "audit_key": self.audit_key.hex(),
                "identity_key": self.identity_key.hex(),
                "audit_signature": self.audit_signature.hex(),
                "identity_signature": self.identity_signature.hex(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicEnrolment:
        """Parses and verifies; raises EnrolmentError saying what was wrong."""
        if len(data) > MAX_ENROLMENT_BYTES:
            raise EnrolmentError(f"enrolment: got {len(data)} bytes, want <= 65536")
        try:
            raw: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnrolmentError(f"enrolment: got {exc}, want canonical JSON") from None
        if type(raw) is not dict or sorted(raw) != sorted(_FIELDS):
            got = sorted(raw) if type(raw) is dict else type(raw).__name__
            raise EnrolmentError(f"enrolment: got fields {got}, want {sorted(_FIELDS)}")
        if raw["schema_version"] != ENROLMENT_SCHEMA_VERSION:
            raise EnrolmentError(
                f"enrolment.schema_version: got {raw['schema_version']!r}, "
                f"want {ENROLMENT_SCHEMA_VERSION}"
            )
        for name in _FIELDS[1:]:
            if type(raw[name]) is not str:
                raise EnrolmentError(f"enrolment.{name}: got {raw[name]!r}, want a string")
        try:
            enrolment = cls(
                party_id=raw["party_id"],
                certificate_request=raw["certificate_request"].encode("ascii"),
                audit_key=bytes.fromhex(raw["audit_key"]),
                identity_key=bytes.fromhex(raw["identity_key"]),
                audit_signature=bytes.fromhex(raw["audit_signature"]),
                identity_signature=bytes.fromhex(raw["identity_signature"]),
            )
        except (ValueError, UnicodeEncodeError) as exc:
            raise EnrolmentError(f"enrolment: got {exc}, want hex keys and an ASCII PEM") from None
        enrolment.verify()
        return enrolment


def certificate_identities_of_request(request: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def _statement(party_id: str, request: bytes, audit: bytes, identity: bytes) -> bytes:
    body = {
        "party_id": party_id,
        "certificate_request": request.decode("ascii"),
        "audit_key": audit.hex(),
        "identity_key": identity.hex(),
    }
    return ENROLMENT_CONTEXT + canonical_json(body)
