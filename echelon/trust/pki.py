"""X.509 for mTLS and the PEM encodings of a party's keys: the federation's CA, certificate
requests, and certificates whose SAN is the party's certificate identity and whose extended
key usage is what its role needs (servers: server and client auth; boundaries and auditors,
which only dial out: client auth).

TLS keys are ECDSA P-256 (what every gRPC TLS stack accepts); the manifest root, audit and
identity keys are Ed25519. Time is a parameter (`now`), never read here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError
from .manifest import CERTIFICATE_IDENTITY_RE, PartyRole

DEFAULT_VALIDITY = timedelta(days=365)
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from a little before `now`
SERVER_ROLES = frozenset({PartyRole.COORDINATOR, PartyRole.AUDIT_LOG})


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key for a party's TLS certificate."""
    return ec.generate_private_key(ec.SECP256R1())


def key_sha256(public_key: ec.EllipticCurvePublicKey | x509.Certificate) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo (DER): the pin a manifest holds for a TLS key."""
    key = public_key.public_key() if isinstance(public_key, x509.Certificate) else public_key
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def certificate_identities(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the certificate's SAN (none when it has no SAN extension)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


@dataclass(frozen=True)
class CertificateAuthority:
    """The federation's CA: signs each party's TLS certificate (development kits)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(
        cls, name: str, *, now: datetime, validity: timedelta = DEFAULT_VALIDITY
    ) -> CertificateAuthority:
        """A self-signed CA that may sign leaf certificates only (path length 0)."""
        key = generate_tls_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=certificate)

    def issue(
        self,
        request: x509.CertificateSigningRequest,
        *,
        identity: str,
        role: PartyRole,
        now: datetime,
        validity: timedelta = DEFAULT_VALIDITY,
    ) -> x509.Certificate:
        """A certificate for the request's key, naming `identity` (SAN DNS name and CN), with
        the extended key usage of `role`. Raises CertificateError when the request is not
        self-signed correctly or names another identity."""
        check_request(request, identity)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in SERVER_ROLES:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        public = request.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)  # check_request made sure
        ca_public = self.key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )


def certificate_request(
    key: ec.EllipticCurvePrivateKey, identity: str
) -> x509.CertificateSigningRequest:
    """A CSR for `identity` (SAN DNS name and CN), signed by the key it certifies."""
    _check_identity(identity)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def check_request(request: x509.CertificateSigningRequest, identity: str) -> None:
    """Raises CertificateError unless the CSR is signed by its own ECDSA P-256 key (proof of
    possession) and names exactly `identity` in its SAN."""
    _check_identity(identity)
    if not request.is_signature_valid:
        raise CertificateError(
            "certificate request: got a signature that does not verify, want one by the "
            "requested key (proof that its holder has the private key)"
        )
    public = request.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise CertificateError(
            f"certificate request: got a {type(public).__name__} key, want ECDSA P-256"
        )
    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if names != [identity]:
        raise CertificateError(
            f"certificate request: got SAN DNS names {names}, want exactly [{identity!r}] "
            "(the party it is provisioned as)"
        )


# --- PEM files ----------------------------------------------------------------------------


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def request_pem(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's mode (0600) is what guards it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ed25519_public_pem(raw: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a 32-byte Ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_certificate(pem: bytes, what: str) -> x509.Certificate:
    """Raises CertificateError naming `what` when `pem` is not one PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"{what}: got {exc}, want a PEM certificate") from None


def load_request(pem: bytes, what: str) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CertificateError(f"{what}: got {exc}, want a PEM certificate request") from None


def load_tls_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 private key from PKCS#8 PEM; raises CertificateError naming `what`."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{what}: got {exc}, want an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertificateError(f"{what}: got a {type(key).__name__}, want an ECDSA P-256 key")
    return key


def load_ed25519_private(pem: bytes, what: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{what}: got {exc}, want an unencrypted PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CertificateError(f"{what}: got a {type(key).__name__}, want an Ed25519 key")
    return key


def load_ed25519_public(pem: bytes, what: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key in SubjectPublicKeyInfo PEM."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise CertificateError(f"{what}: got {exc}, want a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(f"{what}: got a {type(key).__name__}, want an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_identity(identity: str) -> None:
    if not CERTIFICATE_IDENTITY_RE.fullmatch(identity):
        raise CertificateError(
            f"certificate identity: got {identity!r}, want a lower-case DNS name"
        )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
