"""A sender's proof that its records are on the log: each append answered with a tree head
signed by the log's key (the manifest's), the record's inclusion proof under it, and the
head's consistency with the last head the sender verified.

`ProofChain` is pure (no I/O): it holds the latest head its party verified and checks
each answer against it, raising VerificationError for a signature, inclusion or
consistency that fails, and MissingProof for an answer without proof. A log operator
who acknowledges a record and drops it, or shows this party a tree that another party
does not see, is caught here, before the party's next egress (the callers halt it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .checkpoint import NoteVerifier, TreeHead
from .errors import VerificationError
from .merkle import verify_consistency, verify_inclusion


class MissingProof(VerificationError):
    """The log answered an append without the proof the sender asked for."""


@dataclass(frozen=True, kw_only=True)
class AppendProof:
    """What a proving append answer carries (besides the record's index and leaf)."""

    index: int
    leaf_hash: bytes
    checkpoint: bytes  # the signed tree head that covers the record
    inclusion: tuple[bytes, ...]
    consistency: tuple[bytes, ...]
    consistency_from: int


class ProofChain:
    """The latest tree head a party verified and the checks of each answer; thread-safe."""

    def __init__(self, verifier: NoteVerifier, *, latest: TreeHead | None = None) -> None:
        self._verifier = verifier
        self._lock = threading.Lock()
        self._latest = latest
        self._checkpoint = b""
        self.proven = 0  # records proven so far

    @property
    def latest(self) -> TreeHead | None:
        with self._lock:
            return self._latest

    @property
    def checkpoint(self) -> bytes:
        """The latest verified head as the log signed it (empty before the first)."""
        with self._lock:
            return self._checkpoint

    @property
    def known_size(self) -> int:
        with self._lock:
            return 0 if self._latest is None else self._latest.size

    def check(self, proof: AppendProof) -> TreeHead:
        """Verifies one answer and keeps its head. Raises MissingProof, CheckpointError,
        ProofError, RootMismatchError (a dropped record, or a fork)."""
        if not proof.checkpoint:
            raise MissingProof(
                f"record at index {proof.index}",
                expected="a signed tree head and inclusion proof",
                found="none",
            )
        head = self._verifier.verify(proof.checkpoint)
        if head.size <= proof.index:
            raise MissingProof(
                f"tree head for record {proof.index}",
                expected=f"size > {proof.index}",
                found=head.size,
            )
        verify_inclusion(proof.index, head.size, proof.leaf_hash, proof.inclusion, head.root_hash)
        with self._lock:
            seen = self._latest
            base = 0 if seen is None else seen.size
            if proof.consistency_from != base:
                raise MissingProof(
                    "consistency proof",
                    expected=f"from the last verified size {base}",
                    found=proof.consistency_from,
                )
            if seen is not None:
                if head.origin != seen.origin:
                    raise VerificationError(
                        "tree head origin", expected=seen.origin, found=head.origin
                    )
                verify_consistency(
                    seen.size, head.size, seen.root_hash, head.root_hash, proof.consistency
                )
            if seen is None or head.size >= seen.size:
                self._latest, self._checkpoint = head, proof.checkpoint
            self.proven += 1
            return head
