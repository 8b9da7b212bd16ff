"""The signed federation manifest: who takes part in a run, with which certificate identity and
keys, under which run declaration; signed by the federation's root key, parsed by one strict
parser, and checked by every party against a root it received out of band.

Byte layout (docs/trust.md): canonical JSON (`echelon.audit.record.canonical_json`) of
`{"manifest": {...}, "signature": hex}`; the root key signs `SIGNATURE_CONTEXT` followed by the
canonical JSON of the `manifest` object, whose `declaration` is the run declaration's own
canonical object (`RunDeclaration.to_canonical_bytes`), not a copy of its fields.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.audit.checkpoint import verifier_key_for
from echelon.audit.errors import RecordError
from echelon.audit.log import PinnedParty
from echelon.audit.record import MAX_INT, PARTY_RE, Role, canonical_json
from echelon.declaration import DeclarationError, RunDeclaration

from .errors import ManifestError, ManifestVerificationError

MANIFEST_SCHEMA_VERSION = 1
SIGNATURE_CONTEXT = b"echelon/federation-manifest/v1\x00"  # the root key signs nothing else
MAX_MANIFEST_BYTES = 1 << 20
ED25519_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SHA256_BYTES = 32
# A DNS name in lower case: what a certificate's SAN holds and what gRPC checks a server by.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
CERTIFICATE_IDENTITY_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
_T = TypeVar("_T")


class PartyRole(StrEnum):
    """What a party is in the federation."""

    COORDINATOR = "coordinator"
    AUDIT_LOG = "audit-log"
    BOUNDARY = "boundary"
    AUDITOR = "auditor"


@dataclass(frozen=True, kw_only=True)
class Party:
    """One party of a run and the public material it is known by.

    `tls_key_sha256` pins the party's TLS key: SHA-256 of its certificate's
    SubjectPublicKeyInfo (DER), so a certificate renewed over the same key still matches and
    another certificate for the same name does not. `audit_key` signs the party's audit
    records (the audit log's: its tree heads); `identity_key` signs its registration and its
    secure-aggregation messages. Raises ManifestError (path `party.<field>`).
    """

    party_id: str
    role: PartyRole
    certificate_identity: str
    tls_key_sha256: bytes
    audit_key: bytes
    identity_key: bytes

    def __post_init__(self) -> None:
        if type(self.party_id) is not str or not PARTY_RE.fullmatch(self.party_id):
            raise ManifestError(
                "party.party_id", f"got {self.party_id!r}, want [a-z0-9][a-z0-9._-]{{0,62}}"
            )
        if not isinstance(self.role, PartyRole):
            raise ManifestError("party.role", f"got {self.role!r}, want a PartyRole")
        name = self.certificate_identity
        if type(name) is not str or not CERTIFICATE_IDENTITY_RE.fullmatch(name):
            raise ManifestError(
                "party.certificate_identity",
                f"got {name!r}, want a lower-case DNS name (the certificate's SAN)",
            )
        _check_length("party.tls_key_sha256", self.tls_key_sha256, SHA256_BYTES, "SHA-256")
        _check_ed25519("party.audit_key", self.audit_key)
        _check_ed25519("party.identity_key", self.identity_key)

    def public_keys(self) -> Iterator[tuple[str, bytes]]:
        """(field, value) of every key or key pin the party is known by."""
        yield "tls_key_sha256", self.tls_key_sha256
        yield "audit_key", self.audit_key
        yield "identity_key", self.identity_key

    def _encode(self) -> dict[str, Any]:
        return {
            "party_id": self.party_id,
            "role": self.role.value,
            "certificate_identity": self.certificate_identity,
            "tls_key_sha256": self.tls_key_sha256.hex(),
            "audit_key": self.audit_key.hex(),
            "identity_key": self.identity_key.hex(),
        }


@dataclass(frozen=True, kw_only=True)
class FederationManifest:
    """The unsigned body: the run's parties and its declaration, at one version.

    The run id is the declaration's. Parties are kept sorted by id (one encoding per set).
    Raises ManifestError: a party id, certificate identity or key that two parties share,
    the root key used as a party key, not exactly one coordinator and one audit log, or
    fewer boundaries than the declaration's m_min.
    """

    version: int
    root_key: bytes  # Ed25519 public key of the federation root that signs this manifest
    parties: tuple[Party, ...]
    declaration: RunDeclaration
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if type(self.schema_version) is not int or self.schema_version != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(
                "manifest.schema_version",
                f"got {self.schema_version!r}, want {MANIFEST_SCHEMA_VERSION} "
                "(the only schema this build reads)",
            )
        if type(self.version) is not int or not 1 <= self.version <= MAX_INT:
            raise ManifestError(
                "manifest.version", f"got {self.version!r}, want an integer in [1, 2^63-1]"
            )
        _check_ed25519("manifest.root_key", self.root_key)
        if not isinstance(self.declaration, RunDeclaration):
            raise ManifestError("manifest.declaration", "want a RunDeclaration")
        object.__setattr__(self, "parties", tuple(sorted(self.parties, key=_party_id)))
        self._check_unique()
        self._check_roles()

    def _check_unique(self) -> None:
        ids = [p.party_id for p in self.parties]
        for a, b in itertools.pairwise(ids):  # sorted: a duplicate is a neighbour
            if a == b:
                raise ManifestError(
                    "manifest.parties.party_id", f"got {a!r} twice, want each party once"
                )
        identities: dict[str, str] = {}  # certificate identity -> the party that has it
        keys: dict[bytes, str] = {}
        for party in self.parties:
            holder = identities.setdefault(party.certificate_identity, party.party_id)
            if holder != party.party_id:
                raise ManifestError(
                    "manifest.parties.certificate_identity",
                    f"got {party.certificate_identity!r} for both {holder} and "
                    f"{party.party_id}, want each party's own",
                )
            for field, key in party.public_keys():
                if key == self.root_key:
                    raise ManifestError(
                        f"manifest.parties.{field}",
                        f"party {party.party_id} uses the root key, want a key of its own",
                    )
                holder = keys.setdefault(key, party.party_id)
                if holder != party.party_id:
                    raise ManifestError(
                        f"manifest.parties.{field}",
                        f"got the key of {holder} for {party.party_id} too, want each "
                        "party's own keys",
                    )

    def _check_roles(self) -> None:
        for role in (PartyRole.COORDINATOR, PartyRole.AUDIT_LOG):
            count = len(self.with_role(role))
            if count != 1:
                raise ManifestError(
                    "manifest.parties", f"got {count} parties of role {role}, want exactly 1"
                )
        boundaries = len(self.with_role(PartyRole.BOUNDARY))
        m_min = self.declaration.window.m_min
        if boundaries < m_min:
            raise ManifestError(
                "manifest.parties",
                f"got {boundaries} boundaries, want at least the declaration's window.m_min "
                f"= {m_min} (a smaller federation can never unmask a sum)",
            )

    @property
    def run_id(self) -> str:
        return self.declaration.run_id

    def party(self, party_id: str) -> Party | None:
        """The party with this id, or None."""
        return next((p for p in self.parties if p.party_id == party_id), None)

    def party_by_certificate_identity(self, name: str) -> Party | None:
        """The party whose certificate presents this SAN name, or None."""
        return next((p for p in self.parties if p.certificate_identity == name), None)

    def audit_signers(self) -> dict[str, PinnedParty]:
        """The parties that sign records on the run's audit log (coordinator and
        boundaries), with the audit key and role each must register: the log refuses any
        other signer, and `echelon audit verify` any other key."""
        roles = {PartyRole.BOUNDARY: Role.BOUNDARY, PartyRole.COORDINATOR: Role.COORDINATOR}
        return {
            p.party_id: PinnedParty(signing_key=p.audit_key, role=roles[p.role])
            for p in self.parties
            if p.role in roles
        }

    def log_verifier_key(self) -> str:
        """The audit log's checkpoint verifier key: its party id and audit key."""
        (log_party,) = self.with_role(PartyRole.AUDIT_LOG)
        return verifier_key_for(log_party.party_id, log_party.audit_key)

    def with_role(self, role: PartyRole) -> tuple[Party, ...]:
        """The parties of one role, by id."""
        return tuple(p for p in self.parties if p.role == role)

    def to_canonical_bytes(self) -> bytes:
        """Canonical JSON of the body; the root signs SIGNATURE_CONTEXT + these bytes."""
        return canonical_json(self._encode())

    def _encode(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "version": self.version,
            "root_key": self.root_key.hex(),
            "parties": [p._encode() for p in self.parties],
            "declaration": json.loads(self.declaration.to_canonical_bytes()),
        }

    def sign(self, root_private_key: Ed25519PrivateKey) -> SignedManifest:
        """Signs the body with the federation root key; raises ManifestError when that key is
        not the one the manifest names as its root."""
        public = _raw_public(root_private_key.public_key())
        if public != self.root_key:
            raise ManifestError(
                "manifest.root_key",
                f"names root {self.root_key.hex()[:16]}..., the signing key is "
                f"{public.hex()[:16]}...; want the manifest's own root",
            )
        signature = root_private_key.sign(SIGNATURE_CONTEXT + self.to_canonical_bytes())
        return SignedManifest(manifest=self, signature=signature)


@dataclass(frozen=True, kw_only=True)
class SignedManifest:
    """A manifest with the root's signature: what is written to a kit, recorded and checked.

    `from_bytes` only parses; `verify(root)` is what makes it trustworthy.
    """

    manifest: FederationManifest
    signature: bytes

    def __post_init__(self) -> None:
        _check_length("manifest.signature", self.signature, SIGNATURE_BYTES, "Ed25519")

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def version(self) -> int:
        return self.manifest.version

    def to_bytes(self) -> bytes:
        """Canonical JSON of `{"manifest": ..., "signature": hex}` (a kit's manifest.json)."""
        return canonical_json(
            {"manifest": self.manifest._encode(), "signature": self.signature.hex()}
        )

    def verify(self, root_public_key: bytes) -> FederationManifest:
        """The manifest, once its signature checks against `root_public_key` (32 raw bytes,
        received out of band). Raises ManifestVerificationError when the manifest names
        another root or the signature does not verify."""
        if root_public_key != self.manifest.root_key:
            raise ManifestVerificationError(
                "manifest.root_key",
                expected=f"the trusted root {root_public_key.hex()}",
                found=self.manifest.root_key.hex(),
            )
        key = Ed25519PublicKey.from_public_bytes(root_public_key)
        try:
            key.verify(self.signature, SIGNATURE_CONTEXT + self.manifest.to_canonical_bytes())
        except InvalidSignature:
            raise ManifestVerificationError(
                "manifest.signature",
                expected=f"an Ed25519 signature by root {root_public_key.hex()[:16]}...",
                found="a signature that does not verify (the manifest or signature was altered)",
            ) from None
        return self.manifest

    def check_successor(self, previous: SignedManifest) -> FederationManifest:
        """Accepts this manifest as the next version after `previous` (already verified):
        the same run id, a strictly greater version, signed by the same root. Returns the
        manifest; raises ManifestVerificationError saying which rule failed."""
        if self.run_id != previous.run_id:
            raise ManifestVerificationError(
                "manifest.declaration.run_id", expected=previous.run_id, found=self.run_id
            )
        if self.version <= previous.version:
            raise ManifestVerificationError(
                "manifest.version",
                expected=f"a version > {previous.version} (the current one)",
                found=self.version,
            )
        return self.verify(previous.manifest.root_key)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        """The one parser; refuses anything `to_bytes` would not write. Does not verify the
        signature. Raises ManifestError naming the field."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError("manifest", f"got {len(data)} bytes, want <= {MAX_MANIFEST_BYTES}")
        try:
            raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError("manifest", f"got {exc}, want canonical JSON") from None
        envelope = _object(raw, "signed manifest", ("manifest", "signature"))
        signed = cls(
            manifest=_decode_manifest(envelope["manifest"]),
            signature=_hex(envelope["signature"], "manifest.signature"),
        )
        if signed.to_bytes() != data:
            raise ManifestError(
                "manifest",
                "got another encoding of a valid manifest, want the canonical one (sorted "
                "keys, no whitespace, UTF-8, parties sorted by id)",
            )
        return signed


def root_public_bytes(root_private_key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of the root's public key, as a manifest names it."""
    return _raw_public(root_private_key.public_key())


# --- the parser ---------------------------------------------------------------------------

_PARTY_FIELDS = (
    "party_id",
    "role",
    "certificate_identity",
    "tls_key_sha256",
    "audit_key",
    "identity_key",
)
_MANIFEST_FIELDS = ("schema_version", "version", "root_key", "parties", "declaration")


def _decode_manifest(raw: Any) -> FederationManifest:
    obj = _object(raw, "manifest", _MANIFEST_FIELDS)
    schema = obj["schema_version"]
    if type(schema) is not int or schema != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            "manifest.schema_version", f"got {_show(schema)}, want {MANIFEST_SCHEMA_VERSION}"
        )
    if type(obj["version"]) is not int:
        raise ManifestError("manifest.version", f"got {_show(obj['version'])}, want an integer")
    if type(obj["parties"]) is not list:
        raise ManifestError("manifest.parties", f"got {_show(obj['parties'])}, want a list")
    parties = tuple(
        _decode_party(p, f"manifest.parties[{i}]") for i, p in enumerate(obj["parties"])
    )
    return _build(
        "manifest",
        lambda: FederationManifest(
            schema_version=schema,
            version=obj["version"],
            root_key=_hex(obj["root_key"], "manifest.root_key"),
            parties=parties,
            declaration=_decode_declaration(obj["declaration"]),
        ),
    )


def _decode_party(raw: Any, path: str) -> Party:
    obj = _object(raw, path, _PARTY_FIELDS)
    for name in ("party_id", "role", "certificate_identity"):
        if type(obj[name]) is not str:
            raise ManifestError(f"{path}.{name}", f"got {_show(obj[name])}, want a string")
    roles = {r.value: r for r in PartyRole}
    if obj["role"] not in roles:
        raise ManifestError(
            f"{path}.role", f"got {_show(obj['role'])}, want one of {sorted(roles)}"
        )
    return _build(
        path,
        lambda: Party(
            party_id=obj["party_id"],
            role=roles[obj["role"]],
            certificate_identity=obj["certificate_identity"],
            tls_key_sha256=_hex(obj["tls_key_sha256"], f"{path}.tls_key_sha256"),
            audit_key=_hex(obj["audit_key"], f"{path}.audit_key"),
            identity_key=_hex(obj["identity_key"], f"{path}.identity_key"),
        ),
    )


def _decode_declaration(raw: Any) -> RunDeclaration:
    try:
        return RunDeclaration.from_canonical_bytes(canonical_json(raw))
    except RecordError as exc:  # a JSON number with a fraction: the declaration has none
        raise ManifestError("manifest.declaration", f"{exc}") from None
    except DeclarationError as exc:
        message = str(exc).removeprefix(f"{exc.path}: ")
        raise ManifestError(f"manifest.{exc.path}", message) from None


def _build(path: str, make: Callable[[], _T]) -> _T:
    """`make()`, a `party.` error renamed to where the party sits in the file."""
    try:
        return make()
    except ManifestError as exc:
        if exc.path.startswith("party."):
            message = str(exc).removeprefix(f"{exc.path}: ")
            raise ManifestError(path + exc.path.removeprefix("party"), message) from None
        raise


def _object(raw: Any, path: str, fields: tuple[str, ...]) -> dict[str, Any]:
    if type(raw) is not dict:
        raise ManifestError(path, f"got {_show(raw)}, want an object")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ManifestError(f"{path}.{unknown[0]}", f"unknown key, want only {sorted(fields)}")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise ManifestError(f"{path}.{missing[0]}", "missing, want every field present")
    return raw


def _hex(raw: Any, path: str) -> bytes:
    if type(raw) is not str or not _HEX_RE.fullmatch(raw):
        raise ManifestError(path, f"got {_show(raw)}, want lowercase hex")
    return bytes.fromhex(raw)


def _check_length(path: str, value: object, want: int, what: str) -> None:
    if type(value) is not bytes or len(value) != want:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else repr(value)
        raise ManifestError(path, f"got {got}, want {want} bytes ({what})")


def _check_ed25519(path: str, value: object) -> None:
    _check_length(path, value, ED25519_KEY_BYTES, "an Ed25519 public key")
    assert isinstance(value, bytes)
    try:
        Ed25519PublicKey.from_public_bytes(value)
    except ValueError:
        raise ManifestError(path, "got 32 bytes that are not an Ed25519 public key") from None


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _party_id(party: Party) -> str:
    return party.party_id


def _show(raw: Any) -> str:
    text = json.dumps(raw, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ManifestError("manifest", f"got key {key!r} twice, want each key once")
        out[key] = value
    return out
