"""Audit records: the closed payload-type enum, typed attributes, and the canonical encoding.

The canonical encoding (docs/audit.md) is what a sender signs and what the log
stores; `AuditRecord.decode` accepts only bytes that `encode` would produce.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from json.encoder import encode_basestring as _json_string
from typing import Any, ClassVar, TypeAlias

from .errors import RecordError

RECORD_VERSION = 1
SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024
SIGNATURE_BYTES = 64
LOG_PARTY = "audit-log"  # receiver of records addressed to the log itself (key registrations)
MAX_INT = (1 << 63) - 1

# The fields of echelon.common.v1.WindowMetadata, the only metadata that may cross in the
# clear: the base version (staleness) and the device count. Any statistic of a boundary's
# data crosses only as a masked coordinate; one in the clear is refused and a finding.
METADATA_FIELDS = frozenset({"base_version", "devices"})

PARTY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_TEXT_RE = re.compile(r"[\x20-\x7e]{0,512}")


class PayloadType(IntEnum):
    """Mirrors `echelon.common.v1.PayloadType` value for value (a test checks it)."""

    UNSPECIFIED = 0
    KEY_REGISTRATION = 1
    RUN_CONFIG = 2
    WINDOW_OPEN = 3
    WINDOW_ACK = 4
    KEY_ADVERTISEMENT = 5
    ENCRYPTED_SHARES = 6
    MASKED_DELTA = 7
    PLAIN_DELTA = 8
    WINDOW_METADATA = 9
    SURVIVOR_LIST = 10
    SURVIVOR_SIGNATURE = 11
    UNMASKING_SHARES = 12
    GLOBAL_ADAPTER = 13
    WINDOW_ABORT = 14
    STATUS = 15
    TREE_HEAD = 16
    CONTRIBUTION_DROPPED = 17
    ROUND_REQUEST = 18
    MANIFEST = 19


class Role(StrEnum):
    """What a party is; the policy allows payload types per role."""

    BOUNDARY = "boundary"
    COORDINATOR = "coordinator"


class Direction(StrEnum):
    """Which side of a crossing logged the record; the logging side signs it."""

    SENT = "sent"
    RECEIVED = "received"


_ROLES = {r.value: r for r in Role}
_DIRECTIONS = {d.value: d for d in Direction}
_HEX_RE = re.compile(r"[0-9a-f]*")

# --- typed attributes, one closed set per payload type ---------------------------------

_Kind: TypeAlias = str  # "int", "bool", "hex", "text", "names", "role"


def _json_bool(field: str, value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    raise RecordError(field, expected="true or false", found=repr(value))


def _json_value(field: str, kind: _Kind, value: Any) -> str:
    """The canonical JSON text of one value of `kind`.

    Raises RecordError where an int or bool field holds what decode would refuse.
    """
    if kind == "int":
        if type(value) is not int or not 0 <= value <= MAX_INT:
            raise RecordError(field, expected=f"an integer in 0..{MAX_INT}", found=repr(value))
        return str(value)
    if kind == "bool":
        return _json_bool(field, value)
    if kind == "hex":
        return f'"{bytes(value).hex()}"'
    if kind == "names":
        return "[" + ",".join(_json_string(name) for name in value) + "]"
    if kind in ("text", "role"):
        return _json_string(str(value))
    raise AssertionError(f"unknown attribute kind {kind}")


def _decode_value(field: str, kind: _Kind, raw: Any) -> Any:
    if kind == "int":
        if type(raw) is not int or not 0 <= raw <= MAX_INT:
            raise RecordError(field, expected=f"an integer in 0..{MAX_INT}", found=repr(raw))
        return raw
    if kind == "bool":
        if type(raw) is not bool:
            raise RecordError(field, expected="true or false", found=repr(raw))
        return raw
    if kind == "hex":
        if type(raw) is not str or len(raw) % 2 or _HEX_RE.fullmatch(raw) is None:
            raise RecordError(field, expected="lowercase hex of whole bytes", found=repr(raw)[:80])
        return bytes.fromhex(raw)
    if kind == "text":
        if type(raw) is not str or _TEXT_RE.fullmatch(raw) is None:
            raise RecordError(field, expected="printable ASCII, at most 512", found=repr(raw)[:80])
        return raw
    if kind == "role":
        role = _ROLES.get(raw) if type(raw) is str else None
        if role is None:
            raise RecordError(field, expected=sorted(_ROLES), found=repr(raw)[:80])
        return role
    if kind == "names":
        if type(raw) is not list or not all(type(n) is str for n in raw):
            raise RecordError(field, expected="a list of names", found=repr(raw)[:80])
        return tuple(raw)
    raise AssertionError(f"unknown attribute kind {kind}")


class _Attributes:
    """Shared (de)serialization of the attribute classes: `_KINDS` maps field to kind."""

    _KINDS: ClassVar[dict[str, _Kind]] = {}
    # (name, error field, kind) in key order; set per class from _KINDS.
    _FIELDS: ClassVar[tuple[tuple[str, str, _Kind], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._FIELDS = tuple(
            (name, f"record.attributes.{name}", kind) for name, kind in sorted(cls._KINDS.items())
        )

    def json_text(self) -> str:
        """The canonical JSON object of these attributes."""
        values = (
            f'"{name}":{_json_value(field, kind, getattr(self, name))}'
            for name, field, kind in self._FIELDS
        )
        return "{" + ",".join(values) + "}"

    @classmethod
    def _decode_fields(cls, obj: Any) -> dict[str, Any]:
        if type(obj) is not dict:
            raise RecordError("record.attributes", expected="an object", found=type(obj).__name__)
        if obj.keys() != cls._KINDS.keys():
            raise RecordError("record.attributes", expected=sorted(cls._KINDS), found=sorted(obj))
        return {name: _decode_value(field, kind, obj[name]) for name, field, kind in cls._FIELDS}


@dataclass(frozen=True, kw_only=True)
class NoAttributes(_Attributes):
    """Payload types that carry no typed attributes."""

    _KINDS: ClassVar[dict[str, _Kind]] = {}


TRANSPORT_MTLS, TRANSPORT_INSECURE = "mtls", "insecure"
TRANSPORTS = (TRANSPORT_MTLS, TRANSPORT_INSECURE)


@dataclass(frozen=True, kw_only=True)
class KeyRegistration(_Attributes):
    """A party's identity: its role, Ed25519 signing key and X25519 agreement key (or
    empty), and how it connects: `mtls` (its manifest kit) or `insecure` (plaintext, which
    `echelon audit verify` reports in its verdict)."""

    role: Role
    signing_key: bytes
    agreement_key: bytes = b""
    transport: str = TRANSPORT_INSECURE
    _KINDS: ClassVar[dict[str, _Kind]] = {
        "role": "role",
        "signing_key": "hex",
        "agreement_key": "hex",
        "transport": "text",
    }

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise RecordError(
                "record.attributes.transport", expected=list(TRANSPORTS), found=self.transport
            )
        if len(self.signing_key) != 32:
            raise RecordError(
                "record.attributes.signing_key",
                expected="32 bytes",
                found=f"{len(self.signing_key)}",
            )
        if len(self.agreement_key) not in (0, 32):
            raise RecordError(
                "record.attributes.agreement_key",
                expected="0 or 32 bytes",
                found=f"{len(self.agreement_key)}",
            )


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Attributes):
    """The run's declared configuration: its canonical JSON bytes (see `policy.run_config`)."""

    config: bytes
    _KINDS: ClassVar[dict[str, _Kind]] = {"config": "hex"}

    def __post_init__(self) -> None:
        if not 0 < len(self.config) <= 16 * 1024:
            raise RecordError(
                "record.attributes.config", expected="1..16384 bytes", found=f"{len(self.config)}"
            )


@dataclass(frozen=True, kw_only=True)
class DeltaAttributes(_Attributes):
    """A boundary delta's provenance: cohort size (m) and devices in its sum (k)."""

    cohort_size: int
    devices: int
    _KINDS: ClassVar[dict[str, _Kind]] = {"cohort_size": "int", "devices": "int"}


@dataclass(frozen=True, kw_only=True)
class MetadataAttributes(_Attributes):
    """The names of the WindowMetadata fields present in the payload, sorted, unique."""

    fields: tuple[str, ...]
    _KINDS: ClassVar[dict[str, _Kind]] = {"fields": "names"}

    def __post_init__(self) -> None:
        if list(self.fields) != sorted(set(self.fields)):
            raise RecordError(
                "record.attributes.fields", expected="sorted unique names", found=list(self.fields)
            )
        bad = [f for f in self.fields if _NAME_RE.fullmatch(f) is None]
        if bad:
            raise RecordError("record.attributes.fields", expected="snake_case names", found=bad)


@dataclass(frozen=True, kw_only=True)
class DroppedAttributes(_Attributes):
    """A dropped contribution's staleness (versions behind)."""

    staleness: int
    _KINDS: ClassVar[dict[str, _Kind]] = {"staleness": "int"}


@dataclass(frozen=True, kw_only=True)
class ManifestAttributes(_Attributes):
    """A signed federation manifest's version (the payload is its bytes: the record holds
    their SHA-256, which `echelon audit verify --manifest` compares)."""

    version: int
    _KINDS: ClassVar[dict[str, _Kind]] = {"version": "int"}


Attributes: TypeAlias = (
    NoAttributes
    | ManifestAttributes
    | KeyRegistration
    | RunConfig
    | DeltaAttributes
    | MetadataAttributes
    | DroppedAttributes
)

_ATTRIBUTE_CLASS: dict[PayloadType, type[Attributes]] = {
    PayloadType.KEY_REGISTRATION: KeyRegistration,
    PayloadType.RUN_CONFIG: RunConfig,
    PayloadType.MASKED_DELTA: DeltaAttributes,
    PayloadType.PLAIN_DELTA: DeltaAttributes,
    PayloadType.WINDOW_METADATA: MetadataAttributes,
    PayloadType.CONTRIBUTION_DROPPED: DroppedAttributes,
    PayloadType.MANIFEST: ManifestAttributes,
}


def attribute_class(payload_type: PayloadType) -> type[Attributes]:
    """The attribute class a record of `payload_type` must carry."""
    return _ATTRIBUTE_CLASS.get(payload_type, NoAttributes)


# --- the record ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SecAggLevels:
    """Secure-aggregation levels in force; a baseline run has one of them off."""

    level1: bool
    level2: bool

    @property
    def baseline(self) -> bool:
        return not (self.level1 and self.level2)


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The egress policy's decision; a refused payload always says why."""

    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        if self.accepted == bool(self.reason):
            raise RecordError(
                "verdict.reason",
                expected="empty when accepted, non-empty when refused",
                found=repr(self.reason),
            )
        if _TEXT_RE.fullmatch(self.reason) is None:
            raise RecordError(
                "verdict.reason", expected="printable ASCII, at most 512", found=self.reason[:80]
            )


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One side's account of one cross-boundary payload (or of a refusal to send it).

    `signer` (the sender of a SENT record, the receiver of a RECEIVED one) signs
    the canonical encoding with its registered Ed25519 key; `counter` is the
    signer's own strictly increasing counter.
    """

    counter: int
    time_ms: int
    window: int
    sender: str
    receiver: str
    direction: Direction
    payload_type: PayloadType
    schema_version: int
    payload_size: int
    payload_sha256: bytes
    verdict: Verdict
    levels: SecAggLevels
    attributes: Attributes

    def __post_init__(self) -> None:
        for name in ("counter", "time_ms", "window", "schema_version", "payload_size"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_INT:
                raise RecordError(f"record.{name}", expected=f"0..{MAX_INT}", found=repr(value))
        for name in ("sender", "receiver"):
            value = getattr(self, name)
            if type(value) is not str or PARTY_RE.fullmatch(value) is None:
                raise RecordError(
                    f"record.{name}", expected="a party id [a-z0-9][a-z0-9._-]*", found=repr(value)
                )
        if self.sender == self.receiver:
            raise RecordError("record.receiver", expected="not the sender", found=self.receiver)
        if len(self.payload_sha256) != 32:
            raise RecordError(
                "record.payload_sha256", expected="32 bytes", found=len(self.payload_sha256)
            )
        want = attribute_class(self.payload_type)
        if type(self.attributes) is not want:
            raise RecordError(
                "record.attributes",
                expected=f"{want.__name__} for {self.payload_type.name}",
                found=type(self.attributes).__name__,
            )
        if self.payload_type == PayloadType.UNSPECIFIED and self.verdict.accepted:
            raise RecordError("record.payload_type", expected="a named type", found="UNSPECIFIED")

    @property
    def signer(self) -> str:
        """The party that logged and signed this record."""
        return self.sender if self.direction == Direction.SENT else self.receiver

    def encode(self) -> bytes:
        """The canonical encoding: what the signer signs and the log stores.

        Written key by key in sorted order. The constructors checked the integers and
        party ids, so only the reason needs JSON escaping; a test pins the result to
        `canonical_json` of the same object.
        """
        levels, verdict = self.levels, self.verdict
        return (
            f'{{"attributes":{self.attributes.json_text()},"counter":{self.counter},'
            f'"direction":"{self.direction.value}",'
            f'"levels":{{"level1":{_json_bool("record.levels.level1", levels.level1)},'
            f'"level2":{_json_bool("record.levels.level2", levels.level2)}}},'
            f'"payload_sha256":"{self.payload_sha256.hex()}","payload_size":{self.payload_size},'
            f'"payload_type":{int(self.payload_type)},"receiver":"{self.receiver}",'
            f'"schema_version":{self.schema_version},"sender":"{self.sender}",'
            f'"time_ms":{self.time_ms},'
            f'"verdict":{{"accepted":{_json_bool("record.verdict.accepted", verdict.accepted)},'
            f'"reason":{_json_string(verdict.reason)}}},'
            f'"version":{RECORD_VERSION},"window":{self.window}}}'
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> AuditRecord:
        """Parses a canonical encoding. Raises RecordError naming the offending field.

        Parses with the plain JSON decoder: bytes that re-encode to themselves hold no
        duplicate key, float or NaN, so the strict decoder, which names those, runs only
        to explain a refusal.
        """
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError("record", expected=f"<= {MAX_RECORD_BYTES} bytes", found=len(data))
        try:
            record = _from_json(_loads(data, _DECODER))
            canonical = record.encode()
            if canonical != data:
                raise _not_canonical(canonical, data)
        except RecordError:
            _loads(data, _STRICT_DECODER)  # raises first for duplicate keys and non-integers
            raise
        return record


def _not_canonical(canonical: bytes, data: bytes) -> RecordError:
    at = next(
        (i for i, (a, b) in enumerate(zip(canonical, data, strict=False)) if a != b),
        min(len(canonical), len(data)),
    )
    return RecordError(
        "record",
        expected=f"canonical encoding ({canonical[at : at + 16]!r} at byte {at})",
        found=repr(bytes(data[at : at + 16])),
    )


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8; refuses floats, NaN and non-string keys."""
    _refuse_floats(obj)
    return _ENCODER.encode(obj).encode("utf-8")


# Encoder and decoders are built once: json.dumps/json.loads with options build a new one
# per call, which cost about a quarter of decoding a record.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _refuse_floats(obj: Any) -> None:
    if isinstance(obj, float):
        raise RecordError("value", expected="an integer", found=repr(obj))
    if isinstance(obj, dict):
        for value in obj.values():
            _refuse_floats(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _refuse_floats(value)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecordError(f"record.{key}", expected="one occurrence", found="a duplicate key")
        out[key] = value
    return out


def _refuse_number(text: str) -> Any:
    raise RecordError("record", expected="integers only", found=text)


# `decode` parses with the plain decoder and, to explain a refusal, with the strict one.
_DECODER = json.JSONDecoder()
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_float=_refuse_number, parse_constant=_refuse_number
)


def _loads(data: bytes, decoder: json.JSONDecoder) -> Any:
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError as exc:
        raise RecordError("record", expected="ASCII bytes", found=f"byte {exc.start}") from None
    try:
        obj, end = decoder.raw_decode(text)  # no whitespace skipping: a record has none
    except json.JSONDecodeError as exc:
        raise RecordError("record", expected="JSON", found=f"{exc.msg} at {exc.pos}") from None
    except ValueError as exc:  # an integer longer than Python converts (4300 digits)
        raise RecordError("record", expected="JSON integers", found=str(exc)[:80]) from None
    if end != len(text):
        raise RecordError("record", expected="one JSON value", found=f"extra data at {end}")
    return obj


_TOP_KEYS = frozenset(
    {
        "attributes",
        "counter",
        "direction",
        "levels",
        "payload_sha256",
        "payload_size",
        "payload_type",
        "receiver",
        "schema_version",
        "sender",
        "time_ms",
        "verdict",
        "version",
        "window",
    }
)
# Frozen values that most records share: decode reuses them instead of building new ones.
_LEVELS = {(a, b): SecAggLevels(level1=a, level2=b) for a in (False, True) for b in (False, True)}
_ACCEPTED = Verdict(accepted=True)
_NO_ATTRIBUTES = NoAttributes()
_LEVEL_KEYS = frozenset({"level1", "level2"})
_VERDICT_KEYS = frozenset({"accepted", "reason"})
_PAYLOAD_TYPES = {t.value: t for t in PayloadType}


def _object(obj: Any, where: str, keys: frozenset[str]) -> dict[str, Any]:
    if type(obj) is not dict:
        raise RecordError(where, expected="an object", found=type(obj).__name__)
    if obj.keys() != keys:
        unknown = sorted(set(obj) - keys)
        missing = sorted(keys - set(obj))
        raise RecordError(
            where, expected=sorted(keys), found=f"unknown {unknown}, missing {missing}"
        )
    return obj


def _from_json(obj: Any) -> AuditRecord:
    top = _object(obj, "record", _TOP_KEYS)
    version = _decode_value("record.version", "int", top["version"])
    if version != RECORD_VERSION:
        raise RecordError("record.version", expected=RECORD_VERSION, found=version)
    raw_type = _decode_value("record.payload_type", "int", top["payload_type"])
    payload_type = _PAYLOAD_TYPES.get(raw_type)
    if payload_type is None:
        raise RecordError("record.payload_type", expected="a PayloadType value", found=raw_type)
    raw_direction = top["direction"]
    direction = _DIRECTIONS.get(raw_direction) if type(raw_direction) is str else None
    if direction is None:
        raise RecordError(
            "record.direction", expected="sent or received", found=repr(raw_direction)[:80]
        )
    raw_levels = _object(top["levels"], "record.levels", _LEVEL_KEYS)
    levels = _LEVELS[
        _decode_value("record.levels.level1", "bool", raw_levels["level1"]),
        _decode_value("record.levels.level2", "bool", raw_levels["level2"]),
    ]
    raw_verdict = _object(top["verdict"], "record.verdict", _VERDICT_KEYS)
    accepted = _decode_value("record.verdict.accepted", "bool", raw_verdict["accepted"])
    reason = _decode_value("record.verdict.reason", "text", raw_verdict["reason"])
    verdict = _ACCEPTED if accepted and not reason else Verdict(accepted=accepted, reason=reason)
    cls = attribute_class(payload_type)
    fields = cls._decode_fields(top["attributes"])
    attributes = _NO_ATTRIBUTES if cls is NoAttributes else cls(**fields)
    # AuditRecord.__post_init__ checks the integers and the party ids.
    return AuditRecord(
        counter=top["counter"],
        time_ms=top["time_ms"],
        window=top["window"],
        schema_version=top["schema_version"],
        payload_size=top["payload_size"],
        sender=top["sender"],
        receiver=top["receiver"],
        direction=direction,
        payload_type=payload_type,
        payload_sha256=_decode_value("record.payload_sha256", "hex", top["payload_sha256"]),
        verdict=verdict,
        levels=levels,
        attributes=attributes,
    )


def leaf_data(record: bytes, signature: bytes) -> bytes:
    """The Merkle leaf: 4-byte big-endian record length, the record, the 64-byte signature."""
    if len(signature) != SIGNATURE_BYTES:
        raise RecordError("signature", expected=f"{SIGNATURE_BYTES} bytes", found=len(signature))
    return len(record).to_bytes(4, "big") + record + signature


def replace(record: AuditRecord, **changes: Any) -> AuditRecord:
    """A copy of `record` with fields changed (re-validated)."""
    return dataclasses.replace(record, **changes)
