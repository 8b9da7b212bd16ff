"""The egress allow-list: which payloads may cross, from whom, in what shape.

One pure function, `Policy.check`, decides; the egress gate calls it before a
payload leaves and the verifier calls it again over the whole log, against the
policy of the run's declaration (`echelon.declaration.RunDeclaration.policy`), which
its RUN_CONFIG record holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .record import (
    METADATA_FIELDS,
    SCHEMA_VERSION,
    Attributes,
    DeltaAttributes,
    MetadataAttributes,
    PayloadType,
    Role,
    SecAggLevels,
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
    P.MANIFEST: _MIB,
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
            P.MANIFEST,  # each version of the run's signed manifest, to the log
        }
    ),
}

_DELTAS = (P.MASKED_DELTA, P.PLAIN_DELTA)


@dataclass(frozen=True, kw_only=True)
class PayloadAllowList:
    """Which payload types each role may send, their size bounds, and the schema versions.

    Every role gets an entry (an empty set when it may send nothing), so two lists that
    allow the same payloads compare equal.
    """

    schema_versions: frozenset[int] = frozenset({SCHEMA_VERSION})
    max_bytes: Mapping[PayloadType, int] = field(default_factory=lambda: dict(DEFAULT_MAX_BYTES))
    allowed: Mapping[Role, frozenset[PayloadType]] = field(
        default_factory=lambda: dict(DEFAULT_ALLOWED)
    )

    def __post_init__(self) -> None:
        if not self.schema_versions:
            raise ConfigError(
                "PayloadAllowList.schema_versions: got none, want at least one version"
            )
        missing = sorted(
            t.name for t in PayloadType if t != P.UNSPECIFIED and t not in self.max_bytes
        )
        if missing:
            raise ConfigError(
                f"PayloadAllowList.max_bytes: missing {missing}, want a bound for every type"
            )
        if P.UNSPECIFIED in self.max_bytes:
            raise ConfigError("PayloadAllowList.max_bytes: got UNSPECIFIED, want named types only")
        negative = sorted(t.name for t, n in self.max_bytes.items() if n < 0)
        if negative:
            raise ConfigError(f"PayloadAllowList.max_bytes: {negative} negative, want >= 0")
        for role, types in self.allowed.items():
            if P.UNSPECIFIED in types:
                raise ConfigError(
                    f"PayloadAllowList.allowed[{role}]: got UNSPECIFIED, want named types only"
                )
        every_role = {role: frozenset(self.allowed.get(role, frozenset())) for role in Role}
        object.__setattr__(self, "allowed", every_role)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The allow-list of one run, as its declaration (`echelon.declaration`) states it."""

    m_min: int = 2
    k_min: int = 2
    level1: bool = True
    level2: bool = True
    payloads: PayloadAllowList = field(default_factory=PayloadAllowList)

    def __post_init__(self) -> None:
        if self.m_min < 2:
            raise ConfigError(f"Policy.m_min: got {self.m_min}, want >= 2 (a sum of one is one)")
        if self.k_min < 1:
            raise ConfigError(f"Policy.k_min: got {self.k_min}, want >= 1")

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
        payloads = self.payloads
        if payload_type not in payloads.allowed.get(role, frozenset()):
            return f"{payload_type.name} is not allowed from a {role.value}"
        if schema_version not in payloads.schema_versions:
            return f"schema version {schema_version} not in {sorted(payloads.schema_versions)}"
        bound = payloads.max_bytes[payload_type]
        if not 0 <= size <= bound:
            return f"size {size} exceeds {bound} for {payload_type.name}"
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
        """The policy for a verification report (the declaration holds the canonical form)."""
        payloads = self.payloads
        return {
            "allowed": {
                role.value: sorted(t.name for t in payloads.allowed.get(role, frozenset()))
                for role in Role
            },
            "k_min": self.k_min,
            "level1": self.level1,
            "level2": self.level2,
            "m_min": self.m_min,
            "max_bytes": {t.name: n for t, n in sorted(payloads.max_bytes.items())},
            "schema_versions": sorted(payloads.schema_versions),
        }
