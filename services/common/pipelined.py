"""Pipelined audit appends: a party far from the audit log records what crosses without a
round trip to the log on its critical path.

`PipelinedSink` is an `AuditSink` for the egress gate. The gate signs each record at the
moment its payload crosses (the record's counter fixes its place in the party's sequence)
and hands it here; it goes out at once on the party's one `AppendStream` to the log, which
appends and answers records in the order sent, while the party goes on. The party calls
`egress()` before each message it sends, and that is where the invariant is kept:

    every record the party signed before its previous egress is on the log (appended and
    answered by the log) before its next egress leaves.

So at most the records of one step of the protocol are in flight, and a party whose log
refuses or cannot take a record stops: the failure halts its egress (fail closed), every
later record is refused at once, and `egress()` raises. In a window the log's round trips
overlap the coordinator's, which a party waits for anyway (docs/threat-model.md, "What is
recorded, and when"). `flush()` waits for everything queued (a clean stop).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog

from echelon.audit import AppendResult, AuditError
from echelon.audit.log import PENDING
from echelon.audit.merkle import leaf_hash
from echelon.audit.record import leaf_data

log = structlog.get_logger(__name__)
_END = object()


class StreamSink(Protocol):
    """What the pipeline appends through: `services.audit_log.client.AuditClient`."""

    def append_stream(self, records: Iterator[tuple[bytes, bytes]]) -> Iterator[AppendResult]: ...


class PipelineFailed(AuditError):
    """The audit log refused or could not take a pipelined record; the party halts."""


class PipelinedSink:
    """Streams signed records to the log in order and counts its answers; thread-safe."""

    def __init__(
        self,
        client: StreamSink,
        *,
        on_failure: Callable[[str], None] = lambda reason: None,
        fence_timeout_s: float = 60.0,
    ) -> None:
        """`on_failure(reason)` is called once, under the pipeline's lock, when an append
        fails (the party's `halt`: it must not call back). `egress()` gives up after
        `fence_timeout_s`."""
        if fence_timeout_s <= 0:
            raise ValueError(f"PipelinedSink.fence_timeout_s: got {fence_timeout_s}, want > 0")
        self._client = client
        self._on_failure = on_failure
        self._fence_timeout_s = fence_timeout_s
        self._queue: queue.Queue[object] = queue.Queue()  # (record, signature) or _END
        self._issued = 0  # records queued so far (their sequence numbers are 1..issued)
        self._acked = 0  # records the log has answered for, in order
        self._mark = 0  # records queued before the previous egress
        self._failed: str | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="audit-pipeline", daemon=True)
        self._thread.start()

    # -- the gate's side ---------------------------------------------------------------------
    def append(self, record: bytes, signature: bytes) -> AppendResult:
        """Queues a signed record; raises PipelineFailed once an earlier one failed."""
        with self._changed:
            self._raise_if_failed()
            if self._closed:
                raise PipelineFailed("the audit pipeline is closed")
            self._issued += 1
            self._queue.put((record, signature))
        return AppendResult(
            index=PENDING, leaf_hash=leaf_hash(leaf_data(record, signature)), tree_head=None
        )

    # -- the party's side --------------------------------------------------------------------
    def egress(self) -> None:
        """Called before each message the party sends: waits until every record queued
        before its previous egress is on the log, then marks this one. Raises
        PipelineFailed when an append failed or the log does not answer in time."""
        with self._changed:
            mark = self._mark
            ok = self._changed.wait_for(
                lambda: self._failed is not None or self._acked >= mark, self._fence_timeout_s
            )
            self._raise_if_failed()
            if not ok:
                reason = (
                    f"the audit log took no record for {self._fence_timeout_s:g} s "
                    f"({self._acked} of {mark} records due are on it)"
                )
                self._fail(reason)
                raise PipelineFailed(reason)
            self._mark = self._issued

    def flush(self, timeout_s: float) -> bool:
        """Waits until every queued record is on the log; False on timeout or failure."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._failed is not None or self._acked >= self._issued, timeout_s
            )
            return self._failed is None and self._acked >= self._issued

    @property
    def pending(self) -> int:
        """Records queued and not yet answered for by the log."""
        with self._changed:
            return self._issued - self._acked

    def close(self, timeout_s: float = 10.0) -> None:
        """Appends what is queued (up to `timeout_s`), then stops the appending thread."""
        self.flush(timeout_s)
        with self._changed:
            if not self._closed:
                self._closed = True
                self._queue.put(_END)
        self._thread.join(timeout=timeout_s)

    # -- internals ---------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise PipelineFailed(self._failed)

    def _fail(self, reason: str) -> None:
        """Marks the pipeline failed (under the lock) and tells the party once."""
        if self._failed is None:
            self._failed = reason
            self._queue.put(_END)
            self._changed.notify_all()
            log.critical("audit_pipeline_failed", reason=reason)
            self._on_failure(reason)

    def _records(self) -> Iterator[tuple[bytes, bytes]]:
        while (item := self._queue.get()) is not _END:
            assert isinstance(item, tuple)
            yield item

    def _run(self) -> None:
        try:
            for _ in self._client.append_stream(self._records()):
                with self._changed:
                    self._acked += 1
                    self._changed.notify_all()
        except Exception as exc:  # any failure of the log is the same verdict: halt
            with self._changed:
                self._fail(f"the audit log did not take record {self._acked + 1}: {exc}")
            return
        with self._changed:
            if self._acked < self._issued and self._failed is None:
                self._fail(f"the audit log stream ended after {self._acked} records")
