"""Audit records: the enum mirrors the proto, the encoding round-trips and is strictly canonical."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.audit import (
    AuditRecord,
    DeltaAttributes,
    Direction,
    DroppedAttributes,
    KeyRegistration,
    MetadataAttributes,
    NoAttributes,
    PayloadType,
    RecordError,
    Role,
    RunConfig,
    SecAggLevels,
    Verdict,
)
from echelon.audit.record import METADATA_FIELDS, attribute_class, canonical_json
from echelon_proto.common.v1 import common_pb2


def _record(**changes: object) -> AuditRecord:
    fields: dict[str, object] = {
        "counter": 7,
        "time_ms": 1_790_000_000_123,
        "window": 3,
        "sender": "org-a",
        "receiver": "coord",
        "direction": Direction.SENT,
        "payload_type": PayloadType.MASKED_DELTA,
        "schema_version": 1,
        "payload_size": 4096,
        "payload_sha256": bytes(range(32)),
        "verdict": Verdict(accepted=True),
        "levels": SecAggLevels(level1=True, level2=True),
        "attributes": DeltaAttributes(cohort_size=3, devices=4),
    }
    fields.update(changes)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def test_payload_type_mirrors_the_proto_enum() -> None:
    generated = {
        name.removeprefix("PAYLOAD_TYPE_"): value for name, value in common_pb2.PayloadType.items()
    }
    assert generated == {t.name: t.value for t in PayloadType}


def test_metadata_fields_are_the_window_metadata_fields() -> None:
    assert set(common_pb2.WindowMetadata.DESCRIPTOR.fields_by_name) == METADATA_FIELDS


def test_encoding_is_the_documented_canonical_json() -> None:
    data = _record().encode()
    assert data.startswith(b'{"attributes":{"cohort_size":3,"devices":4},"counter":7,')
    assert b" " not in data
    assert json.loads(data)["payload_sha256"] == bytes(range(32)).hex()


EXAMPLES = [
    (PayloadType.KEY_REGISTRATION, KeyRegistration(role=Role.BOUNDARY, signing_key=b"k" * 32)),
    (
        PayloadType.KEY_REGISTRATION,
        KeyRegistration(role=Role.COORDINATOR, signing_key=b"k" * 32, agreement_key=b"a" * 32),
    ),
    (PayloadType.RUN_CONFIG, RunConfig(config=b'{"policy":{}}')),
    (PayloadType.PLAIN_DELTA, DeltaAttributes(cohort_size=2, devices=9)),
    (PayloadType.WINDOW_METADATA, MetadataAttributes(fields=("base_version", "devices"))),
    (PayloadType.CONTRIBUTION_DROPPED, DroppedAttributes(staleness=4)),
    (PayloadType.WINDOW_ACK, NoAttributes()),
]


@pytest.mark.parametrize(("payload_type", "attrs"), EXAMPLES)
def test_every_attribute_class_round_trips(payload_type: PayloadType, attrs: object) -> None:
    record = _record(payload_type=payload_type, attributes=attrs)
    assert AuditRecord.decode(record.encode()) == record
    assert record.encode() == canonical_json(json.loads(record.encode()))


@settings(max_examples=60, deadline=None)
@given(
    counter=st.integers(1, 2**63 - 1),
    window=st.integers(0, 2**40),
    size=st.integers(0, 2**40),
    accepted=st.booleans(),
    reason=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40),
    level1=st.booleans(),
    level2=st.booleans(),
)
def test_round_trip_property(
    counter: int, window: int, size: int, accepted: bool, reason: str, level1: bool, level2: bool
) -> None:
    record = _record(
        counter=counter,
        window=window,
        payload_size=size,
        verdict=Verdict(accepted=accepted, reason="" if accepted else reason),
        levels=SecAggLevels(level1=level1, level2=level2),
    )
    data = record.encode()
    assert AuditRecord.decode(data) == record
    assert data == canonical_json(json.loads(data))  # encode writes exactly canonical JSON


ENCODE_REFUSED: dict[str, dict[str, object]] = {
    "int for a level": {"levels": SecAggLevels(level1=1, level2=True)},  # type: ignore[arg-type]
    "bool for a count": {"attributes": DeltaAttributes(cohort_size=True, devices=4)},
    "negative count": {"attributes": DeltaAttributes(cohort_size=-1, devices=4)},
}


@pytest.mark.parametrize("case", sorted(ENCODE_REFUSED))
def test_encode_refuses_values_that_decode_would_refuse(case: str) -> None:
    record = _record(**ENCODE_REFUSED[case])
    with pytest.raises(RecordError):
        record.encode()


def _mutated(mutate: object) -> bytes:
    obj = json.loads(_record().encode())
    mutate(obj)  # type: ignore[operator]
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


HOSTILE = {
    "unknown key": (_mutated(lambda o: o.update(extra=1)), "record"),
    "missing key": (_mutated(lambda o: o.pop("window")), "record"),
    "bool for int": (_mutated(lambda o: o.update(window=True)), "record.window"),
    "string for int": (_mutated(lambda o: o.update(window="3")), "record.window"),
    "negative int": (_mutated(lambda o: o.update(counter=-1)), "record.counter"),
    "huge int": (_mutated(lambda o: o.update(counter=2**64)), "record.counter"),
    "uppercase hex": (
        _mutated(lambda o: o.update(payload_sha256=o["payload_sha256"].upper())),
        "record.payload_sha256",
    ),
    "short digest": (_mutated(lambda o: o.update(payload_sha256="00")), "record.payload_sha256"),
    "unknown payload type": (_mutated(lambda o: o.update(payload_type=99)), "record.payload_type"),
    "attributes of another type": (
        _mutated(lambda o: o.update(attributes={"staleness": 1})),
        "record.attributes",
    ),
    "extra attribute": (
        _mutated(lambda o: o["attributes"].update(k=1)),
        "record.attributes",
    ),
    "unknown direction": (_mutated(lambda o: o.update(direction="both")), "record.direction"),
    "bad party id": (_mutated(lambda o: o.update(sender="Org A")), "record.sender"),
    "refused without reason": (
        _mutated(lambda o: o.update(verdict={"accepted": False, "reason": ""})),
        "verdict.reason",
    ),
    "other version": (_mutated(lambda o: o.update(version=2)), "record.version"),
    "whitespace": (_record().encode().replace(b":", b": ", 1), "record"),
    "float": (_record().encode().replace(b'"window":3', b'"window":3.0'), "record"),
    "duplicate key": (
        _record().encode().replace(b'"window":3', b'"window":3,"window":3'),
        "record",
    ),
    "non-ascii": (_record().encode().replace(b"org-a", "org-\u00e4".encode()), "record"),
    "trailing garbage": (_record().encode() + b" ", "record"),
    "not json": (b"\x00\x01", "record"),
    "list for direction": (_mutated(lambda o: o.update(direction=[])), "record.direction"),
    "list for role": (
        _mutated(
            lambda o: o.update(
                payload_type=int(PayloadType.KEY_REGISTRATION),
                attributes={
                    "role": [],
                    "signing_key": "00" * 32,
                    "agreement_key": "",
                    "transport": "mtls",
                },
            )
        ),
        "record.attributes.role",
    ),
    "integer too long to convert": (
        _record().encode().replace(b'"window":3', b'"window":' + b"9" * 5000),
        "record",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_strict_decode_refuses_hostile_input(case: str) -> None:
    data, field = HOSTILE[case]
    with pytest.raises(RecordError) as info:
        AuditRecord.decode(data)
    assert info.value.field.startswith(field), info.value


def test_unsorted_keys_are_refused_as_non_canonical() -> None:
    obj = json.loads(_record().encode())
    data = json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode()
    with pytest.raises(RecordError, match="canonical"):
        AuditRecord.decode(data)


def test_record_refuses_attributes_of_another_type() -> None:
    with pytest.raises(RecordError, match="DeltaAttributes"):
        _record(attributes=NoAttributes())


def test_signer_is_the_logging_side() -> None:
    assert _record().signer == "org-a"
    assert _record(direction=Direction.RECEIVED).signer == "coord"
    assert attribute_class(PayloadType.STATUS) is NoAttributes
