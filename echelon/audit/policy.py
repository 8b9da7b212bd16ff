"""The egress allow-list: which payloads may cross, from whom, in what shape.

One pure function, `Policy.check`, decides; the egress gate calls it before a
payload leaves and the verifier calls it again over the whole log, against the
policy declared in the run's RUN_CONFIG record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, RecordError
from .record import (
    METADATA_FIELDS,
    SCHEMA_VERSION,
    Attributes,
    DeltaAttributes,
    MetadataAttributes,
    PayloadType,
    Role,
    SecAggLevels,
    canonical_json,
)

P = PayloadType
_KIB, _MIB = 1024, 1024 * 1024
_VECTOR_BYTES = 4 << 28  # a request bound: services/common/wire.py MAX_VECTOR_ELEMENTS float32

DEFAULT_MAX_BYTES: Mapping[PayloadType, int] = {
    P.KEY_REGISTRATION: 4 * _KIB,
    P.RUN_CONFIG: 16 * _KIB,
    P.WINDOW_OPEN: 64 * _KIB,
    P.WINDOW_ACK: 4 * _KIB,
    P.KEY_ADVERTISEMENT: 64 * _KIB,
    P.ENCRYPTED_SHARES: 4 * _MIB,
    P.MASKED_DELTA: _VECTOR_BYTES,
    P.PLAIN_DELTA: _VECTOR_BYTES,
    P.WINDOW_METADATA: 4 * _KIB,
    P.SURVIVOR_LIST: 64 * _KIB,
    P.SURVIVOR_SIGNATURE: 4 * _KIB,
    P.UNMASKING_SHARES: 4 * _MIB,
    P.GLOBAL_ADAPTER: _VECTOR_BYTES,
    P.WINDOW_ABORT: 4 * _KIB,
    P.STATUS: 4 * _KIB,
    P.TREE_HEAD: 4 * _KIB,
    P.CONTRIBUTION_DROPPED: 4 * _KIB,
    P.ROUND_REQUEST: 4 * _KIB,
}

_COMMON = {P.KEY_REGISTRATION, P.WINDOW_ACK, P.STATUS, P.TREE_HEAD}
DEFAULT_ALLOWED: Mapping[Role, frozenset[PayloadType]] = {
    Role.BOUNDARY: frozenset(
        _COMMON
        | {
            P.KEY_ADVERTISEMENT,
            P.ENCRYPTED_SHARES,
            P.MASKED_DELTA,
            P.PLAIN_DELTA,
            P.WINDOW_METADATA,
            P.SURVIVOR_SIGNATURE,
            P.UNMASKING_SHARES,
            P.CONTRIBUTION_DROPPED,  # a boundary's own statement, to the log: too stale to send
        }
    ),
    Role.COORDINATOR: frozenset(
        _COMMON
        | {
            P.RUN_CONFIG,
            P.WINDOW_OPEN,
            P.KEY_ADVERTISEMENT,
            P.ENCRYPTED_SHARES,
            P.SURVIVOR_LIST,
            P.SURVIVOR_SIGNATURE,  # relayed to the survivors with the unmasking request
            P.UNMASKING_SHARES,
            P.GLOBAL_ADAPTER,
            P.WINDOW_ABORT,
            P.CONTRIBUTION_DROPPED,
            P.ROUND_REQUEST,
        }
    ),
}

_DELTAS = (P.MASKED_DELTA, P.PLAIN_DELTA)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The allow-list of one run; declared in its RUN_CONFIG record."""

    m_min: int = 2
    k_min: int = 2
    level1: bool = True
    level2: bool = True
    schema_versions: frozenset[int] = frozenset({SCHEMA_VERSION})
    max_bytes: Mapping[PayloadType, int] = field(default_factory=lambda: dict(DEFAULT_MAX_BYTES))
    allowed: Mapping[Role, frozenset[PayloadType]] = field(
        default_factory=lambda: dict(DEFAULT_ALLOWED)
    )

    def __post_init__(self) -> None:
        if self.m_min < 2:
            raise ConfigError(f"Policy.m_min: got {self.m_min}, want >= 2 (a sum of one is one)")
        if self.k_min < 1:
            raise ConfigError(f"Policy.k_min: got {self.k_min}, want >= 1")
        if not self.schema_versions:
            raise ConfigError("Policy.schema_versions: got none, want at least one version")
        missing = sorted(
            t.name for t in PayloadType if t != P.UNSPECIFIED and t not in self.max_bytes
        )
        if missing:
            raise ConfigError(f"Policy.max_bytes: missing {missing}, want a bound for every type")
        for role in Role:
            if P.UNSPECIFIED in self.allowed.get(role, frozenset()):
                raise ConfigError(f"Policy.allowed[{role}]: got UNSPECIFIED, want named types only")

    @property
    def levels(self) -> SecAggLevels:
        return SecAggLevels(level1=self.level1, level2=self.level2)

    def check(
        self,
        *,
        role: Role,
        payload_type: PayloadType,
        schema_version: int,
        size: int,
        attributes: Attributes,
    ) -> str | None:
        """Why this payload may not cross, or None when it may."""
        if payload_type == P.UNSPECIFIED:
            return "payload type UNSPECIFIED is not in the closed enum"
        if payload_type not in self.allowed.get(role, frozenset()):
            return f"{payload_type.name} is not allowed from a {role.value}"
        if schema_version not in self.schema_versions:
            return f"schema version {schema_version} not in {sorted(self.schema_versions)}"
        if not 0 <= size <= self.max_bytes[payload_type]:
            return f"size {size} exceeds {self.max_bytes[payload_type]} for {payload_type.name}"
        if payload_type == P.PLAIN_DELTA and self.level2:
            return "PLAIN_DELTA while level-2 secure aggregation is declared on"
        if payload_type in _DELTAS and isinstance(attributes, DeltaAttributes):
            if attributes.cohort_size < self.m_min:
                return f"cohort of {attributes.cohort_size} boundaries, want >= m_min {self.m_min}"
            if attributes.devices < self.k_min:
                return f"sum over {attributes.devices} devices, want >= k_min {self.k_min}"
        if payload_type == P.WINDOW_METADATA and isinstance(attributes, MetadataAttributes):
            extra = sorted(set(attributes.fields) - METADATA_FIELDS)
            if extra:
                return f"metadata fields {extra} are not WindowMetadata scalars"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": {
                role.value: sorted(t.name for t in self.allowed.get(role, frozenset()))
                for role in Role
            },
            "k_min": self.k_min,
            "level1": self.level1,
            "level2": self.level2,
            "m_min": self.m_min,
            "max_bytes": {t.name: n for t, n in sorted(self.max_bytes.items())},
            "schema_versions": sorted(self.schema_versions),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Policy:
        """Raises RecordError when `obj` is not what `to_json` writes."""
        keys = {"allowed", "k_min", "level1", "level2", "m_min", "max_bytes", "schema_versions"}
        if type(obj) is not dict or set(obj) != keys:
            found = sorted(obj) if type(obj) is dict else type(obj).__name__
            raise RecordError("run_config.policy", expected=sorted(keys), found=found)
        try:
            return cls(
                m_min=_int(obj["m_min"], "m_min"),
                k_min=_int(obj["k_min"], "k_min"),
                level1=_bool(obj["level1"], "level1"),
                level2=_bool(obj["level2"], "level2"),
                schema_versions=frozenset(
                    _int(v, "schema_versions") for v in obj["schema_versions"]
                ),
                max_bytes={
                    PayloadType[name]: _int(n, "max_bytes") for name, n in obj["max_bytes"].items()
                },
                allowed={
                    Role(role): frozenset(PayloadType[name] for name in names)
                    for role, names in obj["allowed"].items()
                },
            )
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError("run_config.policy", expected="a policy", found=repr(exc)) from None


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise RecordError(f"run_config.policy.{name}", expected="an integer", found=repr(value))
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise RecordError(f"run_config.policy.{name}", expected="true or false", found=repr(value))
    return value


def run_config(policy: Policy, declared: Mapping[str, Any] | None = None) -> bytes:
    """The canonical JSON of a run's declared configuration: the policy plus other settings.

    `declared` holds the rest (model and tokenizer hashes, hyperparameters); floats
    there are written as decimal strings by the caller, since the encoding is ints only.
    """
    body = dict(declared or {})
    if "policy" in body:
        raise ConfigError("run_config declared: got a 'policy' key, want it passed as `policy`")
    body["policy"] = policy.to_json()
    return canonical_json(body)


def policy_from_run_config(config: bytes) -> Policy:
    """The policy declared in a RUN_CONFIG record's config bytes. Raises RecordError."""
    try:
        obj = json.loads(config.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError("run_config", expected="canonical JSON", found=str(exc)) from None
    if type(obj) is not dict or "policy" not in obj:
        raise RecordError(
            "run_config", expected="an object with 'policy'", found=type(obj).__name__
        )
    if canonical_json(obj) != config:
        raise RecordError("run_config", expected="canonical JSON", found="another encoding")
    return Policy.from_json(obj["policy"])
