"""Protobuf-facing wrapper of the egress gate: how a service audits what crosses.

A payload's bytes are its deterministic protobuf serialization, or for a streamed
vector the vector's bytes (whose SHA-256 the stream header carries), so sender and
receiver record the same digest. Deltas also record their provenance (cohort size,
devices) and their metadata as a separate WINDOW_METADATA record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from echelon.audit.errors import AuditError
from echelon.audit.gate import EgressGate
from echelon.audit.policy import Policy
from echelon.audit.record import (
    LOG_PARTY,
    Attributes,
    DeltaAttributes,
    DroppedAttributes,
    PayloadType,
)

from . import metrics
from .pipelined import PipelinedSink
from .wire import le_bytes

if TYPE_CHECKING:
    from .witnessing import SplitViewCheck

T = TypeVar("T")


class EgressHalted(AuditError):
    """The party stopped all egress; the message says why."""


class _Message(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def message_bytes(message: _Message) -> bytes:
    return message.SerializeToString(deterministic=True)


class AuditedPeer:
    """One party's audited view of the wire; every method records before or on crossing."""

    def __init__(
        self,
        gate: EgressGate,
        rebuild: Callable[[Policy], EgressGate],
        pipeline: PipelinedSink | None = None,
    ) -> None:
        """`pipeline` is the gate's sink when this party's appends are pipelined."""
        self._gate = gate
        self.party = gate.party
        self._rebuild = rebuild
        self._halted: str | None = None
        self.pipeline = pipeline
        # The check of other parties' tree heads against this party's (with proofs).
        self.heads: SplitViewCheck | None = None

    def own_head(self) -> bytes:
        """The latest tree head this party verified, for its frames (empty without)."""
        return b"" if self.heads is None else self.heads.own_head()

    def check_head(self, sender: str, checkpoint: bytes) -> None:
        """Checks a head `sender` attached to its frame (in the background)."""
        if self.heads is not None:
            self.heads.offer(sender, checkpoint)

    def before_egress(self) -> None:
        """Called before each message this party sends: raises EgressHalted when it
        stopped, and with pipelined appends keeps their invariant (`PipelinedSink.egress`):
        a party whose earlier records did not reach the log sends nothing more."""
        _ = self.gate  # raises once halted
        if self.pipeline is not None:
            try:
                self.pipeline.egress()
            except AuditError as exc:
                self.halt(str(exc))
                raise EgressHalted(str(exc)) from exc

    def close(self, timeout_s: float = 10.0) -> None:
        """Appends what the pipeline still holds (a clean stop)."""
        if self.pipeline is not None:
            self.pipeline.close(timeout_s)

    @property
    def gate(self) -> EgressGate:
        """The gate; raises EgressHalted once the party stopped all egress."""
        if self._halted is not None:
            raise EgressHalted(self._halted)
        return self._gate

    @property
    def halted(self) -> str | None:
        """Why this party stopped all egress, or None."""
        return self._halted

    def halt(self, reason: str) -> None:
        """Stops every further crossing (fail closed), e.g. when the audit log forked."""
        if self._halted is None:
            metrics.EGRESS_HALTS.inc()
        self._halted = reason

    def adopt(self, policy: Policy) -> None:
        """Switches to the run's declared policy (learned at registration)."""
        self._gate = self._rebuild(policy)

    def sent(self, payload_type: int, receiver: str, window: int, message: _Message) -> None:
        self.gate.send(
            PayloadType(payload_type), receiver, window, message_bytes(message), None, lambda: None
        )

    def reply(
        self,
        payload_type: int,
        receiver: str,
        window: int,
        message: T,
        attributes: Attributes | None = None,
    ) -> T:
        """Records a response message, then returns it for gRPC to send."""
        data = message_bytes(message)  # type: ignore[arg-type]
        return self.gate.send(
            PayloadType(payload_type), receiver, window, data, attributes, lambda: message
        )

    def received(self, payload_type: int, sender: str, window: int, message: _Message) -> None:
        self.gate.received(PayloadType(payload_type), sender, window, message_bytes(message), None)

    def sent_vector(
        self,
        payload_type: int,
        receiver: str,
        window: int,
        vector: np.ndarray,
        attributes: DeltaAttributes | None = None,
    ) -> None:
        self.gate.send(
            PayloadType(payload_type),
            receiver,
            window,
            le_bytes(vector),
            attributes,
            lambda: None,
        )

    def received_vector(
        self,
        payload_type: int,
        sender: str,
        window: int,
        vector: np.ndarray,
        attributes: DeltaAttributes | None = None,
    ) -> None:
        self.gate.received(PayloadType(payload_type), sender, window, le_bytes(vector), attributes)

    def dropped(self, window: int, staleness: int) -> None:
        """Records that a contribution was dropped as too stale (nothing crosses)."""
        self.gate.send(
            PayloadType.CONTRIBUTION_DROPPED,
            LOG_PARTY,
            window,
            str(staleness).encode(),
            DroppedAttributes(staleness=staleness),
            lambda: None,
        )
