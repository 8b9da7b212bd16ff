"""A party's kit directory: the files one party needs to take part in a run, written with
private modes, and loaded back only when every file agrees with the verified manifest.

Layout: `tls.key` `audit.key` `identity.key` (private, 0600), `tls.crt` `ca.crt`
`manifest.json` `root.pub` (public); the directory itself is 0700.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import CertificateError, KitError, ManifestError, ManifestVerificationError
from .manifest import FederationManifest, Party, SignedManifest
from .pki import (
    certificate_identities,
    ed25519_raw_public,
    key_sha256,
    load_certificate,
    load_ed25519_private,
    load_ed25519_public,
    load_tls_key,
)

TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
CA_CERT = "ca.crt"
AUDIT_KEY = "audit.key"
IDENTITY_KEY = "identity.key"
MANIFEST = "manifest.json"
ROOT_PUB = "root.pub"
PRIVATE_FILES = frozenset({TLS_KEY, AUDIT_KEY, IDENTITY_KEY})
PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_MODE = 0o644


def make_private_dir(directory: Path) -> None:
    """Creates `directory` (and parents) and sets it to 0700 whatever the umask."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR_MODE)


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Writes atomically; a private file is 0600 from its creation, never wider."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.chmod(PRIVATE_MODE if private else PUBLIC_MODE)
    tmp.replace(path)


@dataclass(frozen=True)
class Kit:
    """A loaded, consistent kit: the party, its verified manifest and its private keys."""

    directory: Path
    party: Party
    signed_manifest: SignedManifest
    ca_certificate_pem: bytes
    certificate_pem: bytes
    tls_key_pem: bytes
    audit_key: Ed25519PrivateKey
    identity_key: Ed25519PrivateKey

    @property
    def manifest(self) -> FederationManifest:
        return self.signed_manifest.manifest


def load_kit(directory: Path, *, root_key: bytes | None = None, now: datetime | None = None) -> Kit:
    """Loads the kit in `directory` and checks it: the manifest verifies against `root_key`
    (default: the kit's root.pub, as received out of band), the certificate chains to ca.crt,
    names a manifest party and carries its pinned key, the private keys match the
    certificate and the manifest, and no private file or the directory is readable by
    others. `now` also checks the certificates' validity. Raises KitError saying which."""
    _check_private(directory, PRIVATE_DIR_MODE, "kit directory")
    for name in sorted(PRIVATE_FILES):
        _check_private(directory / name, PRIVATE_MODE, f"party's private key {name}")
    try:
        kit_root = load_ed25519_public(_read(directory / ROOT_PUB), ROOT_PUB)
        if root_key is not None and root_key != kit_root:
            raise KitError(
                f"{directory / ROOT_PUB}: got root {kit_root.hex()[:16]}..., want the trusted "
                f"root {root_key.hex()[:16]}..."
            )
        signed = SignedManifest.from_bytes(_read(directory / MANIFEST))
        manifest = signed.verify(kit_root)
        ca_pem = _read(directory / CA_CERT)
        cert_pem = _read(directory / TLS_CERT)
        ca = load_certificate(ca_pem, CA_CERT)
        certificate = load_certificate(cert_pem, TLS_CERT)
        party = _party_of(certificate, manifest, directory)
        _check_chain(certificate, ca, now)
        tls_pem = _read(directory / TLS_KEY)
        if key_sha256(load_tls_key(tls_pem, TLS_KEY).public_key()) != party.tls_key_sha256:
            raise KitError(f"{directory / TLS_KEY}: not the key of {TLS_CERT}, want its pair")
        audit = load_ed25519_private(_read(directory / AUDIT_KEY), AUDIT_KEY)
        identity = load_ed25519_private(_read(directory / IDENTITY_KEY), IDENTITY_KEY)
    except (ManifestError, ManifestVerificationError, CertificateError) as exc:
        raise KitError(f"{directory}: {exc}") from None
    for name, key, want in (
        (AUDIT_KEY, audit, party.audit_key),
        (IDENTITY_KEY, identity, party.identity_key),
    ):
        if ed25519_raw_public(key) != want:
            raise KitError(
                f"{directory / name}: its public key is not {party.party_id}'s in the "
                "manifest, want the key the manifest names"
            )
    return Kit(
        directory=directory,
        party=party,
        signed_manifest=signed,
        ca_certificate_pem=ca_pem,
        certificate_pem=cert_pem,
        tls_key_pem=tls_pem,
        audit_key=audit,
        identity_key=identity,
    )


def _party_of(certificate: x509.Certificate, manifest: FederationManifest, where: Path) -> Party:
    names = certificate_identities(certificate)
    parties = [p for n in names if (p := manifest.party_by_certificate_identity(n))]
    if len(parties) != 1:
        raise KitError(
            f"{where / TLS_CERT}: names {list(names)}, want the certificate identity of "
            "exactly one manifest party"
        )
    party = parties[0]
    if key_sha256(certificate) != party.tls_key_sha256:
        raise KitError(
            f"{where / TLS_CERT}: its key is not the one the manifest pins for "
            f"{party.party_id}, want a certificate over the pinned key"
        )
    return party


def _check_chain(certificate: x509.Certificate, ca: x509.Certificate, now: datetime | None) -> None:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KitError(f"{TLS_CERT}: not issued by {CA_CERT}, want the federation CA's") from None
    if now is None:
        return
    for name, cert in ((TLS_CERT, certificate), (CA_CERT, ca)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise KitError(
                f"{name}: valid from {cert.not_valid_before_utc} to "
                f"{cert.not_valid_after_utc}, want a certificate valid at {now}"
            )


def _check_private(path: Path, mode: int, what: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        hint = (
            ""
            if path.name not in PRIVATE_FILES
            else "; a kit provisioned from a public enrolment holds no private key: copy "
            "its files into the directory where `echelon keygen` wrote the keys"
        )
        raise KitError(f"{path}: missing, want the {what}{hint}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KitError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, want {mode:04o} (no access for "
            "group or others)"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KitError(f"{path}: missing, want the kit's {path.name}") from None
