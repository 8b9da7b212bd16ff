"""A party's watch over the audit log: it keeps the latest signed tree head it verified and
checks every newer one for consistency, and compares the heads other parties attach to
their frames with its own (`SplitViewCheck`); on a rollback, a fork or a split view it
stops all egress.

A log operator who rolls the log back or forks it is thereby caught by the parties
themselves, and the party fails closed: nothing more crosses its boundary until a
person looks (the gate's `halt`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from echelon.audit.checkpoint import NoteVerifier
from echelon.audit.errors import AuditError, ForkError, LogRangeError, VerificationError
from echelon.audit.merkle import verify_consistency
from echelon.audit.proofs import ProofChain
from echelon.audit.witness import ConsistencySource, Witness

from . import metrics
from .audited import AuditedPeer

log = structlog.get_logger(__name__)
MAX_CHECKPOINT_BYTES = 4096  # a C2SP checkpoint with one signature is a few hundred bytes


class LogWatch:
    """Periodically witnesses the audit log's tree head for one party."""

    def __init__(
        self, *, peer: AuditedPeer, verifier: NoteVerifier, state_file: Path, channel: grpc.Channel
    ) -> None:
        from services.audit_log.client import AuditClient

        self._peer = peer
        self._client = AuditClient(channel)
        self._witness = Witness(path=state_file, verifier=verifier, source=self._client)

    def check(self) -> None:
        """Fetches and checks the current signed tree head; halts egress if it is bad."""
        try:
            head = self._witness.update(self._client.tree_head().checkpoint)
        except VerificationError as exc:
            log.critical("audit_log_inconsistent", error=str(exc))
            metrics.WITNESS_CHECKS.labels("inconsistent").inc()
            self._peer.halt(f"the audit log failed its consistency check: {exc}")
            return
        except AuditError as exc:
            log.warning("audit_log_unreachable", error=str(exc))
            metrics.WITNESS_CHECKS.labels("unreachable").inc()
            return
        metrics.WITNESS_CHECKS.labels("ok").inc()
        metrics.WITNESSED_ENTRIES.set(head.size)
        log.debug("audit_log_witnessed", size=head.size)

    def start(self, every_s: float, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            self.check()
            while not stop.wait(every_s):
                self.check()

        thread = threading.Thread(target=loop, name="audit-witness", daemon=True)
        thread.start()
        return thread


class SplitViewCheck:
    """Compares the tree heads other parties attach to their frames with this party's own
    latest verified head (its `ProofChain`), so that a log showing two parties two trees
    is caught while the run goes on: each head must verify under the log's key, and the
    smaller of the two trees must be a prefix of the larger (a consistency proof from the
    log, which a forked log cannot give). A split view halts this party's egress.

    `offer` never blocks the session: heads are checked on a thread of their own, each
    (size, root) once."""

    def __init__(
        self,
        *,
        peer: AuditedPeer,
        proofs: ProofChain,
        verifier: NoteVerifier,
        source: ConsistencySource,
        unproven_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`unproven_s`: how long another party's heads may stay unproven because the
        log does not answer the consistency request before that counts as a split view
        (a forked log could otherwise refuse to answer); the same bound as the pipeline's
        wait for the log (`PipelinedSink.fence_timeout_s`)."""
        self._peer = peer
        self._proofs = proofs
        self._verifier = verifier
        self._source = source
        self._unproven_s = unproven_s
        self._clock = clock
        self._unproven_since: dict[str, float] = {}  # sender -> first unanswered check
        self._pending: dict[str, bytes] = {}  # the newest head of each sender, unchecked
        self._wake = threading.Condition()
        self._seen: set[bytes] = set()
        self.checked = 0
        self.split: str | None = None
        self._thread = threading.Thread(target=self._run, name="split-view", daemon=True)
        self._thread.start()

    def own_head(self) -> bytes:
        """This party's latest verified head, to attach to its frames (empty before one)."""
        return self._proofs.checkpoint

    def offer(self, sender: str, checkpoint: bytes) -> None:
        if not checkpoint or checkpoint in self._seen:
            return
        if len(checkpoint) > MAX_CHECKPOINT_BYTES:
            log.warning("peer_tree_head_invalid", sender=sender, size=len(checkpoint))
            return
        if len(self._seen) >= 4096:  # a peer sending junk heads cannot grow this
            self._seen.clear()
        self._seen.add(checkpoint)
        with self._wake:  # only a sender's newest head waits: a busy peer costs one check
            self._pending[sender] = checkpoint
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._pending))
                batch, self._pending = self._pending, {}
            for sender, checkpoint in batch.items():
                self._check_or_wait(sender, checkpoint)
                self.checked += 1

    def _check_or_wait(self, sender: str, checkpoint: bytes) -> None:
        """Checks one head; when the log does not answer, the head is checked again with
        a later one, until the sender's heads have gone unproven for `unproven_s`."""
        try:
            self._check(sender, checkpoint)
        except Exception as exc:  # the log did not answer the consistency request
            self._seen.discard(checkpoint)
            now = self._clock()
            since = self._unproven_since.setdefault(sender, now)
            log.warning("tree_head_unchecked", sender=sender, error=str(exc))
            if now - since >= self._unproven_s and self.split is None:
                self._halt(
                    sender,
                    f"split view not ruled out: the audit log has not proved {sender}'s tree "
                    f"heads consistent with this party's for {now - since:.0f} s ({exc})",
                )
            return
        self._unproven_since.pop(sender, None)

    def _halt(self, sender: str, reason: str) -> None:
        self.split = reason
        log.critical("audit_log_split_view", sender=sender, error=reason)
        metrics.WITNESS_CHECKS.labels("inconsistent").inc()
        self._peer.halt(reason)

    def _check(self, sender: str, checkpoint: bytes) -> None:
        try:
            theirs = self._verifier.verify(checkpoint)
        except VerificationError as exc:
            log.warning("peer_tree_head_invalid", sender=sender, error=str(exc))
            return
        own = self._proofs.latest
        if own is None:
            return
        small, big = sorted((own, theirs), key=lambda h: h.size)
        try:
            if small.size == big.size:
                if small.root_hash != big.root_hash:
                    raise ForkError(
                        f"root at size {small.size}",
                        expected=own.root_hash.hex(),
                        found=theirs.root_hash.hex(),
                    )
            else:
                proof = self._source.consistency_proof(small.size, big.size)
                verify_consistency(small.size, big.size, small.root_hash, big.root_hash, proof)
        except (VerificationError, LogRangeError) as exc:
            # (a log that signed a head for `sender` and will not prove it to this party
            # shows the two parties two trees just as surely as a failed proof)
            self._halt(
                sender,
                f"split view: {sender}'s tree head (size {theirs.size}) is not consistent with "
                f"this party's (size {own.size}): {exc}",
            )
