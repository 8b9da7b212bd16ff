"""What the window session records on the audit log: one record per core message, by its
sender before it leaves and by its receiver when it arrives (double entry), with the same
payload type, bytes and digest on both sides. Vectors are recorded as their little-endian
bytes (whose SHA-256 the stream header carries); every other message as a canonical JSON
of its fields. A contribution also records its provenance (cohort size m, devices k) and
its clear metadata, which holds only the base version and the device count."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np

from echelon.audit.gate import EgressGate
from echelon.audit.record import (
    Attributes,
    DeltaAttributes,
    MetadataAttributes,
    PayloadType,
)
from echelon.protocol import messages as m

from . import metrics
from .wire import le_bytes

P = PayloadType
_TYPES: dict[type, PayloadType] = {
    m.OpenWindow: P.WINDOW_OPEN,
    m.KeySetup: P.WINDOW_OPEN,
    m.GlobalVersion: P.GLOBAL_ADAPTER,
    m.KeysRelayed: P.KEY_ADVERTISEMENT,
    m.SharesRelayed: P.ENCRYPTED_SHARES,
    m.SurvivorsAnnounced: P.SURVIVOR_LIST,
    m.UnmaskRequested: P.SURVIVOR_SIGNATURE,
    m.WindowAborted: P.WINDOW_ABORT,
    m.Joined: P.STATUS,
    m.KeysAdvertised: P.KEY_ADVERTISEMENT,
    m.SharesSent: P.ENCRYPTED_SHARES,
    m.SurvivorsSigned: P.SURVIVOR_SIGNATURE,
    m.SharesReleased: P.UNMASKING_SHARES,
    m.Declined: P.WINDOW_ACK,
}
CLEAR_METADATA = ("base_version", "devices")


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def message_payload(message: m.Message) -> bytes:
    """A non-vector message's canonical bytes: sorted-key JSON of its fields."""
    body = {
        f.name: _plain(getattr(message, f.name))
        for f in fields(message)
        if not isinstance(getattr(message, f.name), np.ndarray)
    }
    body["type"] = type(message).__name__
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def records(
    message: m.Message, cohort_size: int
) -> list[tuple[PayloadType, bytes | memoryview, Attributes | None]]:
    if isinstance(message, m.ContributionSent):
        masked = message.vector.dtype == np.uint32
        provenance = DeltaAttributes(cohort_size=cohort_size, devices=message.devices)
        meta = f"base_version={message.base_version},devices={message.devices}".encode()
        return [
            (P.MASKED_DELTA if masked else P.PLAIN_DELTA, le_bytes(message.vector), provenance),
            (P.WINDOW_METADATA, meta, MetadataAttributes(fields=CLEAR_METADATA)),
        ]
    if isinstance(message, m.GlobalVersion):
        phi = le_bytes(message.phi.astype(np.float32))
        return [(P.GLOBAL_ADAPTER, phi, None)]
    return [(_TYPES[type(message)], message_payload(message), None)]


def count_bytes(message: m.Message, *, sent: bool) -> None:
    """Bytes crossing the boundary, by payload type and direction (Prometheus)."""
    counter = metrics.BYTES_OUT if sent else metrics.BYTES_IN
    for payload_type, payload, _ in records(message, 0):
        counter.labels(payload_type.name).inc(len(payload))


def record_sent(gate: EgressGate, message: m.Message, receiver: str, cohort_size: int) -> None:
    """Records `message` before it leaves; raises PolicyViolation or AuditError (then it
    must not be sent)."""
    for payload_type, payload, attributes in records(message, cohort_size):
        gate.send(payload_type, receiver, message.window, payload, attributes, lambda: None)


def record_received(gate: EgressGate, message: m.Message, sender: str, cohort_size: int) -> None:
    """Records `message` as received; raises PolicyViolation (after recording) when it
    should not have crossed."""
    for payload_type, payload, attributes in records(message, cohort_size):
        gate.received(payload_type, sender, message.window, payload, attributes)
