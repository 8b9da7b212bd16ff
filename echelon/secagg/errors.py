"""Typed errors of the secure-aggregation library.

Every error carries what the protocol expected and what it found, so that a
service can map it to a status code with a precise detail and a test can assert
on the fields instead of on message text.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base of every secure-aggregation error: ``expected`` and ``found`` say why."""

    def __init__(self, message: str, *, expected: object = None, found: object = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class ConfigError(SecAggError, ValueError):
    """A configuration value is out of range; the message says what to change."""


class StageError(SecAggError):
    """A protocol method was called in the wrong stage (``expected`` lists the allowed stages)."""


class WrongWindow(SecAggError):
    """A message belongs to another window: a replay or a mis-routed message."""


class UnknownParty(SecAggError):
    """A party id is not in the cohort, or not in the set this step accepts."""


class DuplicateSubmission(SecAggError):
    """A party submitted the same kind of message twice."""


class LengthMismatch(SecAggError):
    """A vector, chunk or encoded message has the wrong length."""


class MalformedMessage(SecAggError):
    """Bytes do not parse as the documented layout of a message type."""


class InvalidSignature(SecAggError):
    """An Ed25519 signature does not verify against the party's identity key."""


class ShareAuthenticationError(SecAggError):
    """An encrypted share failed AES-GCM authentication (tampered, or wrong pair/window)."""


class ConsistencyError(SecAggError):
    """The survivor list or an unmasking request contradicts what this party knows."""


class InsufficientSignatures(SecAggError):
    """Fewer than t valid signatures over the survivor list: shares are withheld."""


class UnexpectedShare(SecAggError):
    """An unmasking share of the wrong kind, or for a party it must not be revealed for."""


class ShareReconstructionError(SecAggError):
    """Shamir reconstruction gave a secret that does not match its public commitment."""


class AbortedRound(SecAggError):
    """The round cannot complete (too few survivors or shares); nothing was applied."""


class InvalidContribution(SecAggError, ValueError):
    """A vector or weight handed to the codec is not finite, not 1-D, or out of range."""
