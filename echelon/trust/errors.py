"""Typed errors of the trust library: each says what was found and what was wanted."""

from __future__ import annotations


class TrustError(Exception):
    """Base of every trust error."""


class ManifestError(TrustError, ValueError):
    """A manifest is not valid or not canonical; `path` names the field
    (`manifest.parties[2].audit_key`), the message says what was found and what is wanted."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class ManifestVerificationError(TrustError):
    """A manifest's signature, root or succession does not check out."""

    def __init__(self, what: str, *, expected: object, found: object) -> None:
        super().__init__(f"{what}: expected {expected}, found {found}")
        self.what = what
        self.expected = expected
        self.found = found


class CertificateError(TrustError, ValueError):
    """A certificate, certificate request or key is malformed or is not the one wanted."""


class EnrolmentError(TrustError, ValueError):
    """An organization's public enrolment file is malformed or does not prove possession."""


class KitError(TrustError):
    """A party's kit directory is incomplete, unsafe (permissions) or inconsistent."""
