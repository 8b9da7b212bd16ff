"""`echelon provision`, `echelon keygen` and `echelon manifest`: kits with private modes and a
verifiable manifest, and the path where an organization's private keys never leave it."""

from __future__ import annotations

import json
import shutil
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from echelon.trust.enrolment import PublicEnrolment
from echelon.trust.errors import EnrolmentError, KitError
from echelon.trust.kit import (
    AUDIT_KEY,
    IDENTITY_KEY,
    MANIFEST,
    PRIVATE_FILES,
    ROOT_PUB,
    TLS_KEY,
    load_kit,
)
from echelon.trust.manifest import PartyRole, SignedManifest
from echelon.trust.pki import key_sha256, load_certificate, load_ed25519_public
from echelon_tools.cli import main as echelon
from echelon_tools.provision import FederationSpec, keygen, provision

from .conftest import NOW, Federation, declaration, make_federation

pytestmark = pytest.mark.timeout(60)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_kit_has_private_modes_and_the_one_signed_manifest(federation: Federation) -> None:
    root = federation.out / "root"
    trusted = load_ed25519_public((root / ROOT_PUB).read_bytes(), ROOT_PUB)

    assert _mode(root) == 0o700
    assert _mode(root / "root.key") == 0o600 and _mode(root / "ca.key") == 0o600
    for party in federation.signed.manifest.parties:
        kit = federation.out / party.party_id
        assert _mode(kit) == 0o700
        assert sorted(p.name for p in kit.iterdir() if _mode(p) == 0o600) == sorted(PRIVATE_FILES)
        assert not (kit / "root.key").exists() and not (kit / "ca.key").exists()
        assert (kit / MANIFEST).read_bytes() == federation.signed.to_bytes()
        assert SignedManifest.from_bytes((kit / MANIFEST).read_bytes()).verify(trusted)


def test_every_kit_loads_as_its_own_party(federation: Federation) -> None:
    roles = {p.party_id: p.role for p in federation.signed.manifest.parties}

    loaded = {party_id: federation.kit(party_id).party.role for party_id in roles}

    assert loaded == roles
    assert roles["coordinator"] == PartyRole.COORDINATOR
    assert roles["audit-log"] == PartyRole.AUDIT_LOG
    assert roles["org-a"] == roles["org-b"] == PartyRole.BOUNDARY


def test_provision_never_overwrites_a_federation(federation: Federation) -> None:
    spec = FederationSpec(declaration=declaration(), boundaries=("org-a", "org-b"))

    with pytest.raises(FileExistsError, match="never overwrite keys"):
        provision(spec, federation.out, now=NOW)


def test_a_kit_readable_by_others_is_refused(federation: Federation) -> None:
    (federation.out / "org-a" / AUDIT_KEY).chmod(0o644)

    with pytest.raises(KitError, match=r"audit.key: mode 0644, want 0600"):
        federation.kit("org-a")


def test_a_kit_whose_certificate_expired_is_refused(federation: Federation) -> None:
    later = NOW + timedelta(days=366)  # provision's default validity is 365 days

    with pytest.raises(KitError, match="want a certificate valid at"):
        load_kit(federation.out / "org-a", now=later)


def test_a_kit_with_another_federations_manifest_is_refused(
    federation: Federation, other_federation: Federation
) -> None:
    kit = federation.out / "org-a"
    shutil.copy(other_federation.out / "org-a" / MANIFEST, kit / MANIFEST)

    with pytest.raises(KitError, match="the trusted root"):
        federation.kit("org-a")


# --- the keygen path ----------------------------------------------------------------------


def _enrolled_federation(tmp_path: Path) -> tuple[Path, Path, Federation]:
    """org-a runs keygen in its own directory; the provisioner sees only the enrolment."""
    own = tmp_path / "org-a-keys"
    enrolment_file = keygen("org-a", own)
    spec = FederationSpec(
        declaration=declaration(),
        boundaries=("org-a", "org-b"),
        enrolments={"org-a": PublicEnrolment.from_bytes(enrolment_file.read_bytes())},
    )
    out = tmp_path / "fed"
    return own, enrolment_file, Federation(out, provision(spec, out, now=NOW))


def test_keygen_keeps_the_private_keys_and_sends_only_public_material(tmp_path: Path) -> None:
    own = tmp_path / "org-a-keys"

    sent = keygen("org-a", own)

    assert _mode(own) == 0o700
    assert all(_mode(own / name) == 0o600 for name in PRIVATE_FILES)
    text = sent.read_text()
    assert "PRIVATE" not in text
    for name in PRIVATE_FILES:  # no private key's bytes appear in what is sent
        assert (own / name).read_text().split("\n")[1] not in text
    assert sorted(json.loads(text)) == [
        "audit_key",
        "audit_signature",
        "certificate_request",
        "identity_key",
        "identity_signature",
        "party_id",
        "schema_version",
    ]


def test_the_enrolled_partys_kit_holds_no_private_key(tmp_path: Path) -> None:
    _, sent, federation = _enrolled_federation(tmp_path)
    kit = federation.out / "org-a"
    enrolment = PublicEnrolment.from_bytes(sent.read_bytes())

    party = federation.signed.manifest.party("org-a")

    assert not any((kit / name).exists() for name in PRIVATE_FILES)
    assert party is not None
    assert party.audit_key == enrolment.audit_key
    assert party.identity_key == enrolment.identity_key
    certificate = load_certificate((kit / "tls.crt").read_bytes(), "tls.crt")
    assert (
        key_sha256(certificate)
        == party.tls_key_sha256
        == key_sha256(
            enrolment.request.public_key()  # type: ignore[arg-type]
        )
    )
    with pytest.raises(KitError, match="echelon keygen"):
        load_kit(kit, now=NOW)


def test_the_enrolled_party_completes_its_kit_with_its_own_keys(tmp_path: Path) -> None:
    own, _, federation = _enrolled_federation(tmp_path)
    for path in (federation.out / "org-a").iterdir():
        shutil.copy(path, own / path.name)

    kit = load_kit(own, now=NOW)

    assert kit.party.party_id == "org-a"
    assert (own / TLS_KEY).read_bytes() == kit.tls_key_pem


def test_an_enrolment_whose_key_was_swapped_is_refused(tmp_path: Path) -> None:
    sent = keygen("org-a", tmp_path / "a")
    other = keygen("org-b", tmp_path / "b")
    obj = json.loads(sent.read_bytes())
    obj["identity_key"] = json.loads(other.read_bytes())["identity_key"]

    with pytest.raises(EnrolmentError, match=r"enrolment\.audit_signature: does not verify"):
        PublicEnrolment.from_bytes(json.dumps(obj).encode())


def test_an_enrolment_for_another_party_is_refused(tmp_path: Path) -> None:
    sent = keygen("org-b", tmp_path / "b")
    spec = FederationSpec(
        declaration=declaration(),
        boundaries=("org-a", "org-b"),
        enrolments={"org-a": PublicEnrolment.from_bytes(sent.read_bytes())},
    )

    with pytest.raises(ValueError, match="the file enrols 'org-b', want 'org-a'"):
        provision(spec, tmp_path / "fed", now=NOW)


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    keygen("org-a", tmp_path / "a")

    with pytest.raises(FileExistsError, match=r"tls\.key: exists"):
        keygen("org-a", tmp_path / "a")


# --- the command line ---------------------------------------------------------------------

MODEL_FLAG = f"{'11' * 32}:{'22' * 32}:{'33' * 32}:64"


def test_cli_provision_keygen_and_manifest_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fed"
    assert echelon(["keygen", "--party", "org-b", "--out", str(tmp_path / "org-b")]) == 0
    sent = tmp_path / "org-b" / "org-b.enrolment.json"
    args = ["provision", "--out", str(out), "--run-id", "demo", "--model", MODEL_FLAG]
    args += ["--boundary", "org-a", "--boundary", "org-b", "--public", f"org-b={sent}"]

    assert echelon(args) == 0
    assert (
        echelon(["manifest", "verify", "--root", str(out / "root" / ROOT_PUB), str(out / "org-b")])
        == 0
    )
    assert echelon(["manifest", "show", str(out / "org-a" / MANIFEST)]) == 0

    printed = capsys.readouterr().out
    assert "kit org-b: " in printed and "(enrolled: holds no private key)" in printed
    assert "ok: run demo version 1" in printed
    assert "org-a          boundary" in printed
    assert not (out / "org-b" / IDENTITY_KEY).exists()


def test_cli_manifest_verify_refuses_another_root(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_federation(tmp_path / "other", run_id="run-2")
    manifest = federation.out / "org-a" / MANIFEST

    status = echelon(
        ["manifest", "verify", "--root", str(other.out / "root" / ROOT_PUB), str(manifest)]
    )

    assert status == 1
    assert "refused: manifest.root_key: expected the trusted root" in capsys.readouterr().err


def test_cli_provision_without_a_model_says_what_is_wanted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["provision", "--out", str(tmp_path / "f"), "--run-id", "demo", "--boundary", "a"]

    assert echelon(args) == 2
    assert "got neither --declaration nor --model" in capsys.readouterr().err
