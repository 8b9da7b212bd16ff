"""Typed errors of the audit library.

Verification failures carry what was expected and what was found (as in
transparency-dev/merkle's `proof/verify.go`), so a caller can assert on fields
and a service can map each class to one status code.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every audit error; ``expected`` and ``found`` say why when they apply."""

    def __init__(self, message: str, *, expected: object = None, found: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.found = found


class RecordError(AuditError, ValueError):
    """A record does not follow the canonical layout (docs/audit.md); ``field`` names where."""

    def __init__(self, field: str, *, expected: object, found: object) -> None:
        super().__init__(f"{field}: got {found}, want {expected}", expected=expected, found=found)
        self.field = field


class ConfigError(AuditError, ValueError):
    """A configuration value is out of range; the message says what to change."""


# --- verification of proofs, tree heads and signatures ---------------------------------


class VerificationError(AuditError):
    """A proof, root, checkpoint or signature failed to verify."""

    def __init__(self, what: str, *, expected: object, found: object) -> None:
        super().__init__(
            f"{what}: expected {expected}, found {found}", expected=expected, found=found
        )
        self.what = what


class ProofError(VerificationError):
    """A proof is malformed for its parameters (wrong length, wrong hash size, bad range)."""


class RootMismatchError(VerificationError):
    """A proof or a recomputed tree yields a root different from the one it was checked against."""


class CheckpointError(VerificationError):
    """A checkpoint (signed note) does not parse or its log signature does not verify."""


class SignatureError(VerificationError):
    """A record's Ed25519 signature does not verify against the signer's registered key."""


class RollbackError(VerificationError):
    """A tree head is smaller than one already witnessed: the log was rolled back."""


class ForkError(VerificationError):
    """A tree head is inconsistent with one already witnessed: the log was forked."""


# --- the log's refusals ----------------------------------------------------------------


class AppendRefused(AuditError):
    """The log refused to append a record."""


class UnknownSigner(AppendRefused):
    """The record's signer has no registered key and the record is not its registration."""


class KeyConflict(AppendRefused):
    """A party tried to register a signing key different from the one it registered."""


class NotAParty(AppendRefused):
    """A log that knows its parties (a manifest's) refused a record: its signer is not one
    of them, it registers a key or role other than the manifest's, or the caller who
    appended it is another party than its signer."""


class CounterReplay(AppendRefused):
    """The signer's counter does not exceed the last counter logged for that signer."""


class LogRangeError(AuditError, IndexError):
    """An index or tree size lies outside the log."""


class StoreCorrupted(AuditError):
    """The stored log does not match its own leaf hashes or signed tree heads."""


# --- the egress gate --------------------------------------------------------------------


class PolicyViolation(AuditError):
    """The egress policy refused a payload; the refusal is on the log at ``index``."""

    def __init__(self, payload_type: str, reason: str, *, index: int) -> None:
        super().__init__(f"{payload_type} refused: {reason} (audit index {index})")
        self.payload_type = payload_type
        self.reason = reason
        self.index = index
