"""A party's watch over the audit log: it keeps the latest signed tree head it verified and
checks every newer one for consistency; on a rollback or a fork it stops all egress.

A log operator who rolls the log back or forks it is thereby caught by the parties
themselves, and the party fails closed: nothing more crosses its boundary until a
person looks (the gate's `halt`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import structlog

from echelon.audit.checkpoint import NoteVerifier
from echelon.audit.errors import AuditError, VerificationError
from echelon.audit.witness import Witness

from . import metrics
from .audited import AuditedPeer

log = structlog.get_logger(__name__)


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
