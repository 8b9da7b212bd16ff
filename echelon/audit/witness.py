"""A party's witness of the audit log: keeps the latest verified tree head, checks every newer one.

A log operator who rolls the log back (a smaller tree than one already seen) or
forks it (a tree that is not an extension of the one seen) is caught by the
first party that sees the new tree head: `Witness.update` raises RollbackError or
ForkError and keeps the head it had.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol

import structlog

from .checkpoint import NoteVerifier, TreeHead
from .errors import CheckpointError, ForkError, RollbackError, VerificationError
from .merkle import verify_consistency

log = structlog.get_logger(__name__)


def read_checkpoint(path: Path) -> bytes:
    """The signed checkpoint a witness file holds (what `Witness` saves)."""
    return str(json.loads(path.read_text())["checkpoint"]).encode()


class ConsistencySource(Protocol):
    """Serves consistency proofs: the audit log client, or an in-process log."""

    def consistency_proof(self, first: int, second: int) -> list[bytes]: ...


class Witness:
    """The latest tree head a party verified, persisted in a small JSON file. Thread-safe."""

    def __init__(self, *, path: Path, verifier: NoteVerifier, source: ConsistencySource) -> None:
        self._path = Path(path)
        self._verifier = verifier
        self._source = source
        self._lock = threading.Lock()
        self._latest: TreeHead | None = None
        self._checkpoint = b""
        if self._path.exists():
            checkpoint = read_checkpoint(self._path)
            self._latest = verifier.verify(checkpoint)
            self._checkpoint = checkpoint

    @property
    def latest(self) -> TreeHead | None:
        with self._lock:
            return self._latest

    @property
    def checkpoint(self) -> bytes:
        """The latest verified checkpoint, as the log signed it (empty before the first)."""
        with self._lock:
            return self._checkpoint

    def update(self, checkpoint: bytes) -> TreeHead:
        """Verifies `checkpoint` and, when it extends the latest, keeps it.

        Raises CheckpointError (bad signature or origin), RollbackError (smaller
        tree), ForkError (same size, other root; or a consistency proof that fails).
        """
        head = self._verifier.verify(checkpoint)
        with self._lock:
            seen = self._latest
            if seen is not None:
                self._check(seen, head)
                if head.size == seen.size:
                    return seen
            self._latest, self._checkpoint = head, checkpoint
            self._save()
        log.info("tree_head_witnessed", tree_size=head.size, root=head.root_hash.hex()[:16])
        return head

    def _check(self, seen: TreeHead, head: TreeHead) -> None:
        if head.origin != seen.origin:
            raise CheckpointError("checkpoint origin", expected=seen.origin, found=head.origin)
        if head.size < seen.size:
            raise RollbackError("tree size", expected=f">= {seen.size}", found=head.size)
        if head.size == seen.size:
            if head.root_hash != seen.root_hash:
                raise ForkError(
                    f"root at size {head.size}",
                    expected=seen.root_hash.hex(),
                    found=head.root_hash.hex(),
                )
            return
        proof = self._source.consistency_proof(seen.size, head.size)
        try:
            verify_consistency(seen.size, head.size, seen.root_hash, head.root_hash, proof)
        except VerificationError as exc:
            raise ForkError(
                f"consistency of size {seen.size} with size {head.size}",
                expected="a tree that extends the witnessed one",
                found=str(exc),
            ) from exc

    def _save(self) -> None:
        tmp = self._path.with_suffix(self._path.suffix + ".tmp")
        tmp.write_text(json.dumps({"checkpoint": self._checkpoint.decode()}, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
