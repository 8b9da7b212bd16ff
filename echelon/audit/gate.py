"""The egress gate: the one choke point every cross-boundary payload passes in its sender.

`EgressGate.send` checks a payload against the run's `Policy`, signs a record of
it, appends the record to the audit log, and only then calls the transport. A
refused payload is logged as refused and never sent. `EgressGate.received`
records the receiving side of a crossing (double entry).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog

from .errors import (
    AppendRefused,
    CounterReplay,
    PolicyViolation,
    RecordError,
    VerificationError,
)
from .log import AppendResult
from .policy import Policy
from .record import (
    SCHEMA_VERSION,
    Attributes,
    AuditRecord,
    Direction,
    NoAttributes,
    PayloadType,
    Role,
    Verdict,
    attribute_class,
)
from .signing import Signer

T = TypeVar("T")
log = structlog.get_logger(__name__)


class AuditSink(Protocol):
    """Where the gate appends signed records: the log client, or a `LocalSink` in-process."""

    def append(self, record: bytes, signature: bytes) -> AppendResult: ...


def wall_clock_ms() -> int:
    """Unix time in milliseconds; the clock `main()` hands to a gate."""
    return time.time_ns() // 1_000_000


class EgressGate:
    """Checks, records and then releases one party's payloads. Thread-safe.

    Records are signed and appended under one lock, so the party's counter and
    its records' order in the log agree; the transport call runs outside it.
    """

    def __init__(
        self,
        *,
        party: str,
        role: Role,
        signer: Signer,
        policy: Policy,
        sink: AuditSink,
        clock: Callable[[], int],
    ) -> None:
        if signer.party != party:
            raise ValueError(f"EgressGate.signer: got party {signer.party!r}, want {party!r}")
        self.party = party
        self.role = role
        self._signer = signer
        self._policy = policy
        self._sink = sink
        self._clock = clock
        self._lock = threading.Lock()
        self._unsent: tuple[bytes, bytes] | None = None  # a record the log did not answer

    def send(
        self,
        payload_type: PayloadType,
        receiver: str,
        window: int,
        payload: bytes | memoryview,  # a byte view: its length and SHA-256 are logged
        attributes: Attributes | None,
        send: Callable[[], T],
        *,
        schema_version: int = SCHEMA_VERSION,
    ) -> T:
        """Logs the payload, then returns `send()`.

        Raises PolicyViolation (after logging the refusal; `send` is not called),
        RecordError for attributes that do not fit the type, and whatever the sink
        raises when the record cannot be logged (then nothing is sent either).
        """
        self._record(
            Direction.SENT,
            payload_type,
            self.party,
            receiver,
            window,
            payload,
            attributes,
            schema_version,
        )
        return send()

    def received(
        self,
        payload_type: PayloadType,
        sender: str,
        window: int,
        payload: bytes | memoryview,
        attributes: Attributes | None,
        *,
        schema_version: int = SCHEMA_VERSION,
    ) -> AppendResult:
        """Logs a payload this party received, checked against the sender's role's allow-list.

        Raises PolicyViolation (after logging) when the payload should not have crossed.
        """
        return self._record(
            Direction.RECEIVED,
            payload_type,
            sender,
            self.party,
            window,
            payload,
            attributes,
            schema_version,
        )

    def _retry_unsent(self) -> None:
        """Appends the record whose append failed before (under the lock), with its own
        counter, so that the party's counters on the log stay consecutive: a gap is then
        always a finding. A CounterReplay means the first try did land. Raises what the
        sink raises when it fails again (the record is kept for the next try unless the
        log judged it)."""
        if self._unsent is None:
            return
        try:
            self._sink.append(*self._unsent)
        except CounterReplay:
            pass  # the append that timed out had reached the log
        except (AppendRefused, RecordError, VerificationError):
            self._unsent = None
            raise
        self._unsent = None

    def refused_receipt(
        self,
        payload_type: PayloadType,
        sender: str,
        window: int,
        payload: bytes | memoryview,
        attributes: Attributes | None,
        reason: str,
    ) -> AppendResult:
        """Logs a payload this party refused on receipt for `reason` (an impersonated
        registration, a run weaker than the manifest's): the refusal is on the log, with the
        digest of what was offered, and nothing of it was taken."""
        reason = "".join(c if " " <= c <= "~" else "?" for c in reason)[:512] or "refused"
        return self._record(
            Direction.RECEIVED,
            payload_type,
            sender,
            self.party,
            window,
            payload,
            attributes,
            SCHEMA_VERSION,
            refusal=reason,
        )

    def _record(
        self,
        direction: Direction,
        payload_type: PayloadType,
        sender: str,
        receiver: str,
        window: int,
        payload: bytes | memoryview,
        attributes: Attributes | None,
        schema_version: int,
        *,
        refusal: str | None = None,
    ) -> AppendResult:
        attributes = attributes if attributes is not None else NoAttributes()
        want = attribute_class(payload_type)
        if type(attributes) is not want:
            raise RecordError(
                "attributes",
                expected=f"{want.__name__} for {payload_type.name}",
                found=type(attributes).__name__,
            )
        # A boundary only ever receives from the coordinator and vice versa.
        peer = Role.COORDINATOR if self.role == Role.BOUNDARY else Role.BOUNDARY
        role = self.role if direction == Direction.SENT else peer
        reason = refusal or self._policy.check(
            role=role,
            payload_type=payload_type,
            schema_version=schema_version,
            size=len(payload),
            attributes=attributes,
        )
        digest = hashlib.sha256(payload).digest()
        with self._lock:
            self._retry_unsent()  # first, so that a failed retry burns no new counter
            record = AuditRecord(
                counter=self._signer.next_counter(),
                time_ms=self._clock(),
                window=window,
                sender=sender,
                receiver=receiver,
                direction=direction,
                payload_type=payload_type,
                schema_version=schema_version,
                payload_size=len(payload),
                payload_sha256=digest,
                verdict=Verdict(accepted=reason is None, reason=reason or ""),
                levels=self._policy.levels,
                attributes=attributes,
            )
            data = record.encode()
            signed = (data, self._signer.sign(data))
            try:
                result = self._sink.append(*signed)
            except Exception as exc:
                if not isinstance(exc, AppendRefused | RecordError | VerificationError):
                    self._unsent = signed  # the log did not answer: the same record goes again
                raise  # (a refusal or a failed proof is the log's verdict: no retry)
        log.info(
            "audit_recorded",
            direction=direction.value,
            payload_type=payload_type.name,
            sender=sender,
            receiver=receiver,
            window=window,
            size=len(payload),
            index=result.index,
            accepted=reason is None,
            reason=reason,
        )
        if reason is not None and refusal is None:
            raise PolicyViolation(payload_type.name, reason, index=result.index)
        return result
