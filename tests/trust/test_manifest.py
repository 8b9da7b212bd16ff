"""The signed federation manifest: round trip, lookups, and every refusal of the parser,
of `verify` and of `check_successor`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.record import canonical_json
from echelon.trust.errors import ManifestError, ManifestVerificationError
from echelon.trust.manifest import (
    SIGNATURE_CONTEXT,
    FederationManifest,
    Party,
    PartyRole,
    SignedManifest,
    root_public_bytes,
)
from echelon.trust.pki import ed25519_raw_public

from .conftest import declaration

pytestmark = pytest.mark.timeout(60)

ROLES = {
    "audit-log": PartyRole.AUDIT_LOG,
    "coordinator": PartyRole.COORDINATOR,
    "org-a": PartyRole.BOUNDARY,
    "org-b": PartyRole.BOUNDARY,
    "auditor": PartyRole.AUDITOR,
}


def _key() -> bytes:
    return ed25519_raw_public(Ed25519PrivateKey.generate())


def _party(party_id: str, role: PartyRole) -> Party:
    return Party(
        party_id=party_id,
        role=role,
        certificate_identity=party_id,
        tls_key_sha256=_key(),  # 32 random bytes stand in for a TLS key's pin
        audit_key=_key(),
        identity_key=_key(),
    )


def _manifest(
    root: Ed25519PrivateKey, *, version: int = 1, run_id: str = "run-1"
) -> FederationManifest:
    return FederationManifest(
        version=version,
        root_key=root_public_bytes(root),
        parties=tuple(_party(p, r) for p, r in ROLES.items()),
        declaration=declaration(run_id),
    )


@pytest.fixture
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signed(root: Ed25519PrivateKey) -> SignedManifest:
    return _manifest(root).sign(root)


def _edited(signed: SignedManifest, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The signed manifest's bytes after `edit` changed its parsed JSON (the signature is
    then stale: these are parser tests)."""
    obj = json.loads(signed.to_bytes())
    edit(obj)
    return canonical_json(obj)


# --- round trip and lookups ---------------------------------------------------------------


def test_round_trip_parses_to_the_same_manifest_and_verifies(
    root: Ed25519PrivateKey, signed: SignedManifest
) -> None:
    data = signed.to_bytes()

    parsed = SignedManifest.from_bytes(data)

    assert parsed == signed
    assert parsed.to_bytes() == data
    assert parsed.verify(root_public_bytes(root)) == signed.manifest
    assert parsed.manifest.declaration == declaration()


def test_the_root_signs_the_context_and_the_canonical_body(
    root: Ed25519PrivateKey, signed: SignedManifest
) -> None:
    body = json.loads(signed.to_bytes())["manifest"]

    root.public_key().verify(signed.signature, SIGNATURE_CONTEXT + canonical_json(body))


def test_the_body_carries_the_declarations_own_canonical_object(signed: SignedManifest) -> None:
    body = json.loads(signed.to_bytes())["manifest"]

    assert canonical_json(body["declaration"]) == declaration().to_canonical_bytes()
    assert "run_id" not in body  # the run id is the declaration's, not a second copy


def test_lookups_by_id_and_by_certificate_identity(signed: SignedManifest) -> None:
    manifest = signed.manifest

    assert manifest.party("org-a") is not None
    assert manifest.party_by_certificate_identity("org-b") == manifest.party("org-b")
    assert manifest.party("mallory") is None
    assert manifest.party_by_certificate_identity("mallory") is None
    assert [p.party_id for p in manifest.with_role(PartyRole.BOUNDARY)] == ["org-a", "org-b"]
    assert [p.party_id for p in manifest.parties] == sorted(ROLES)


# --- verify -------------------------------------------------------------------------------


def test_every_tampered_byte_is_refused(root: Ed25519PrivateKey, signed: SignedManifest) -> None:
    data = signed.to_bytes()
    trusted = root_public_bytes(root)
    accepted = []
    for i in range(len(data)):
        tampered = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        try:
            SignedManifest.from_bytes(tampered).verify(trusted)
        except (ManifestError, ManifestVerificationError):
            continue
        accepted.append(i)

    assert accepted == []


def test_a_changed_key_fails_the_signature(root: Ed25519PrivateKey, signed: SignedManifest) -> None:
    def swap_key(obj: dict[str, Any]) -> None:
        obj["manifest"]["parties"][2]["identity_key"] = _key().hex()

    tampered = SignedManifest.from_bytes(_edited(signed, swap_key))

    with pytest.raises(ManifestVerificationError, match=r"manifest\.signature") as exc:
        tampered.verify(root_public_bytes(root))
    assert exc.value.what == "manifest.signature"


def test_a_manifest_naming_another_root_is_refused(signed: SignedManifest) -> None:
    other = root_public_bytes(Ed25519PrivateKey.generate())

    with pytest.raises(ManifestVerificationError, match="the trusted root") as exc:
        signed.verify(other)
    assert exc.value.what == "manifest.root_key"


def test_a_signature_by_another_key_is_refused(root: Ed25519PrivateKey) -> None:
    manifest = _manifest(root)
    forger = Ed25519PrivateKey.generate()
    forged = SignedManifest(
        manifest=manifest,
        signature=forger.sign(SIGNATURE_CONTEXT + manifest.to_canonical_bytes()),
    )

    with pytest.raises(ManifestVerificationError, match="does not verify"):
        forged.verify(root_public_bytes(root))


def test_signing_with_a_key_other_than_the_named_root_is_refused(
    root: Ed25519PrivateKey,
) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.root_key"):
        _manifest(root).sign(Ed25519PrivateKey.generate())


# --- check_successor ----------------------------------------------------------------------


def test_a_later_version_under_the_same_root_succeeds(
    root: Ed25519PrivateKey, signed: SignedManifest
) -> None:
    nxt = _manifest(root, version=2).sign(root)

    assert nxt.check_successor(signed) == nxt.manifest


def test_a_version_not_above_the_current_one_is_refused(root: Ed25519PrivateKey) -> None:
    current = _manifest(root, version=3).sign(root)
    stale = _manifest(root, version=2).sign(root)
    same = _manifest(root, version=3).sign(root)

    for candidate in (stale, same):
        with pytest.raises(ManifestVerificationError, match=r"manifest\.version"):
            candidate.check_successor(current)


def test_a_successor_for_another_run_is_refused(
    root: Ed25519PrivateKey, signed: SignedManifest
) -> None:
    other_run = _manifest(root, version=2, run_id="run-2").sign(root)

    with pytest.raises(ManifestVerificationError, match="run_id: expected run-1, found run-2"):
        other_run.check_successor(signed)


def test_a_successor_under_another_root_is_refused(signed: SignedManifest) -> None:
    other_root = Ed25519PrivateKey.generate()
    usurper = _manifest(other_root, version=2).sign(other_root)

    with pytest.raises(ManifestVerificationError, match=r"manifest\.root_key"):
        usurper.check_successor(signed)


# --- the parser's refusals ----------------------------------------------------------------


def _party_field(index: int, name: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["manifest"]["parties"][index][name] = value

    return edit


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj["manifest"]["parties"][0].pop(name)


def _set(name: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["manifest"][name] = value

    return edit


def _copy_party_field(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        parties = obj["manifest"]["parties"]
        parties[4][name] = parties[3][name]  # org-b takes org-a's

    return edit


def _declaration_field(name: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["manifest"]["declaration"]["window"][name] = value

    return edit


def _retype(index: int, role: str) -> Callable[[dict[str, Any]], None]:
    return _party_field(index, "role", role)


REFUSALS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown party field": (_party_field(0, "nickname", "x"), r"parties\[0\]\.nickname: unknown"),
    "missing party field": (_drop("audit_key"), r"parties\[0\]\.audit_key: missing"),
    "unknown manifest field": (_set("comment", "x"), r"manifest\.comment: unknown key"),
    "short audit key": (
        _party_field(1, "audit_key", "ab" * 31),
        r"parties\[1\]\.audit_key: got 31 bytes, want 32",
    ),
    "long identity key": (
        _party_field(1, "identity_key", "ab" * 33),
        r"parties\[1\]\.identity_key: got 33 bytes",
    ),
    "short tls pin": (_party_field(1, "tls_key_sha256", "ab"), r"tls_key_sha256: got 1 bytes"),
    "upper-case hex": (_party_field(1, "audit_key", "AB" * 32), r"want lowercase hex"),
    "duplicate party id": (_party_field(4, "party_id", "org-a"), r"got 'org-a' twice"),
    "duplicate certificate identity": (
        _copy_party_field("certificate_identity"),
        r"certificate_identity: got 'org-a' for both",
    ),
    "shared audit key": (_copy_party_field("audit_key"), r"got the key of org-a for org-b"),
    "bad certificate identity": (
        _party_field(2, "certificate_identity", "Org_A"),
        r"want a lower-case DNS name",
    ),
    "unknown role": (_retype(2, "king"), r"parties\[2\]\.role: got \"king\""),
    "two coordinators": (_retype(3, "coordinator"), r"got 2 parties of role coordinator"),
    "one boundary": (_retype(3, "auditor"), r"got 1 boundaries, want at least"),
    "version zero": (_set("version", 0), r"manifest\.version: got 0"),
    "version as text": (_set("version", "2"), r"manifest\.version: got \"2\""),
    "schema version": (_set("schema_version", 2), r"manifest\.schema_version: got 2"),
    "declaration field": (
        _declaration_field("m_min", "1"),
        r"manifest\.declaration\.window\.m_min: got \"1\", want an integer",
    ),
    "declaration m_min": (_declaration_field("m_min", 1), r"declaration\.window\.m_min: got 1"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_parser_refuses(signed: SignedManifest, case: str) -> None:
    edit, message = REFUSALS[case]

    with pytest.raises(ManifestError, match=message):
        SignedManifest.from_bytes(_edited(signed, edit))


def test_a_duplicate_json_key_is_refused(signed: SignedManifest) -> None:
    data = signed.to_bytes().replace(b'{"manifest":', b'{"signature":"00","manifest":', 1)

    with pytest.raises(ManifestError, match="got key 'signature' twice"):
        SignedManifest.from_bytes(data)


def test_a_non_canonical_encoding_is_refused(signed: SignedManifest) -> None:
    spaced = json.dumps(json.loads(signed.to_bytes()), sort_keys=True).encode()

    with pytest.raises(ManifestError, match="want the canonical one"):
        SignedManifest.from_bytes(spaced)


def test_unsorted_parties_are_refused(signed: SignedManifest) -> None:
    def reverse(obj: dict[str, Any]) -> None:
        obj["manifest"]["parties"].reverse()

    with pytest.raises(ManifestError, match="parties sorted by id"):
        SignedManifest.from_bytes(_edited(signed, reverse))


def test_a_float_in_the_declaration_is_refused(signed: SignedManifest) -> None:
    data = signed.to_bytes().replace(b'"m_min":2', b'"m_min":2.5', 1)

    with pytest.raises(ManifestError, match=r"manifest\.declaration"):
        SignedManifest.from_bytes(data)


def test_a_short_signature_is_refused(signed: SignedManifest) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.signature: got 63 bytes, want 64"):
        SignedManifest.from_bytes(_edited(signed, lambda o: o.update(signature="00" * 63)))


def test_the_root_key_is_no_party_key(root: Ed25519PrivateKey) -> None:
    manifest = _manifest(root)
    parties = list(manifest.parties)
    parties[0] = dataclasses.replace(parties[0], audit_key=manifest.root_key)

    with pytest.raises(ManifestError, match="uses the root key"):
        dataclasses.replace(manifest, parties=tuple(parties))
