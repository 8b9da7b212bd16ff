"""The run declaration: one typed, canonical statement of what a run is.

The coordinator builds it from its component configs; it is recorded once on the audit
log (a RUN_CONFIG record) and handed to every boundary at registration; every party
derives its parameters from it through the one parser, `RunDeclaration.from_canonical_bytes`.
Its byte layout (canonical JSON) is in docs/audit.md, "The run declaration"; it is the
body a signed federation manifest will carry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from echelon.audit.policy import PayloadAllowList, Policy
from echelon.audit.record import canonical_json
from echelon.controller import SyncControllerConfig
from echelon.outer import OuterConfig
from echelon.policy import ExportPolicy
from echelon.protocol.config import ProtocolConfig
from echelon.protocol.stats import StatRanges
from echelon.secagg.config import SecAggConfig
from echelon.staleness import StalenessConfig
from echelon.window import WindowConfig

DECLARATION_SCHEMA_VERSION = 3  # 2: the window protocol's knobs (buffered, prekey, ...); 3: windows
DEFAULT_TOKEN_UNIT = 8192.0  # w_b = tokens / token_unit * s(tau)
DIGEST_BYTES = 32
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


class DeclarationError(ValueError):
    """A declaration is not valid or not canonical; `path` names the field
    (`declaration.window.m_min`), the message says what was found and what is wanted."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True, kw_only=True)
class InnerHyper:
    """Inner-loop hyperparameters the coordinator sends with each window."""

    lr: float = 3e-3
    mu: float = 0.0
    batch_size: int = 8
    seq_len: int = 128

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"InnerHyper.lr: got {self.lr}, want > 0")
        if self.mu < 0:
            raise ValueError(f"InnerHyper.mu: got {self.mu}, want >= 0")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("InnerHyper: want batch_size >= 1 and seq_len >= 2")


@dataclass(frozen=True, kw_only=True)
class SecureAggregationConfig:
    """Which secure-aggregation levels are on, and the parameters of level 2."""

    level1: bool = True  # devices mask for one another inside each boundary
    level2: bool = True  # boundaries mask for one another; off = the plain baseline
    threshold_fraction: float = 0.5
    neighbours: int = 0  # SecAgg+ degree; 0 = automatic (complete graph for small cohorts)
    clip: float = 1.0  # per-coordinate clip of a delta before weighting
    frac_bits: int = 16
    max_weight: float = 16.0
    k_min: int = 2  # least devices in a boundary's sum

    def __post_init__(self) -> None:
        if self.k_min < 1:
            raise ValueError(f"SecureAggregationConfig.k_min: got {self.k_min}, want >= 1")
        if self.neighbours < 0:
            raise ValueError(
                f"SecureAggregationConfig.neighbours: got {self.neighbours}, want >= 0"
            )
        self.level2_config()  # the library's checks: threshold, fixed point, no overflow

    def level2_config(self) -> SecAggConfig:
        """The library config of the boundaries' level; raises ConfigError (a ValueError)."""
        return SecAggConfig(
            threshold_fraction=self.threshold_fraction,
            neighbours=self.neighbours or None,
            clip=self.clip,
            frac_bits=self.frac_bits,
            max_weight=self.max_weight,
        )


@dataclass(frozen=True)
class ModelIdentity:
    """What every boundary must share: the base model, its tokenizer, and the layout (and
    length) of the travelling adapter, each by SHA-256."""

    layout_digest: bytes
    base_model_digest: bytes
    tokenizer_digest: bytes
    dim: int

    def __post_init__(self) -> None:
        for name in ("layout_digest", "base_model_digest", "tokenizer_digest"):
            got = len(getattr(self, name))
            if got != DIGEST_BYTES:
                raise ValueError(f"ModelIdentity.{name}: got {got} bytes, want 32 (SHA-256)")
        if self.dim < 1:
            raise ValueError(f"ModelIdentity.dim: got {self.dim}, want >= 1 (adapter length)")


@dataclass(frozen=True, kw_only=True)
class RunDeclaration:
    """Everything a party needs to take part in a run, from one source.

    Components are the configs their owners define (`WindowConfig`, `OuterConfig`, ...);
    nothing here repeats them: m_min is `window.m_min`, k_min and the levels are in
    `secagg`, and `policy()` derives the egress allow-list from them and `payloads`.
    """

    run_id: str
    model: ModelIdentity
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    payloads: PayloadAllowList = field(default_factory=PayloadAllowList)
    window: WindowConfig = field(default_factory=WindowConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    inner: InnerHyper = field(default_factory=InnerHyper)
    adaptive_h: bool = False  # the drift-aware sync controller picks H (and mu) per window
    controller: SyncControllerConfig = field(default_factory=SyncControllerConfig)
    delay_aware: bool = False  # Echelon-DA: boundaries keep training while a window is in flight
    rebase_carry: float = 1.0  # Echelon-DA: share of the overlap's progress kept on re-base
    buffered: bool = False  # FedBuff: a boundary starts again as soon as it has submitted
    prekey: bool = False  # the next window's key rounds overlap this one's unmasking
    token_unit: float = DEFAULT_TOKEN_UNIT
    clip_norm: float = 10.0  # a boundary delta's L2 norm is clipped to this before export
    stats: StatRanges = field(default_factory=StatRanges)  # ranges of the masked statistics
    round_timeout_s: float = 30.0  # a secure-aggregation stage waits at most this long
    windows: int = 0  # the run's length in committed versions; 0: until the coordinator stops
    schema_version: int = DECLARATION_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        check_run_id(self.run_id)
        if self.window.m_min < 2:
            raise DeclarationError(
                "declaration.window.m_min",
                f"got {self.window.m_min}, want >= 2 (a sum over one boundary is its delta)",
            )
        if self.windows < 0:
            raise DeclarationError(
                "declaration.windows", f"got {self.windows}, want >= 0 (0: until stopped)"
            )
        if not self.token_unit > 0:
            raise DeclarationError(
                "declaration.token_unit", f"got {self.token_unit}, want a finite value > 0"
            )
        for path, value in _floats(self, "declaration"):
            if not math.isfinite(value):
                raise DeclarationError(path, f"got {value}, want a finite number")
        try:
            self.protocol()
        except ValueError as exc:
            raise DeclarationError("declaration", f"{exc}") from None

    def protocol(self) -> ProtocolConfig:
        """The window protocol's configuration, for every party's core (all of them know
        the run's length: the coordinator stops there, a boundary trains no further).

        Raises ValueError for a combination the protocol refuses (e.g. buffered and
        delay-aware together)."""
        controller = self.controller if self.adaptive_h else None
        return ProtocolConfig(
            run_id=self.run_id,
            window=self.window,
            level2=self.secagg.level2,
            secagg=self.secagg.level2_config(),
            staleness=self.staleness,
            outer=self.outer,
            controller=controller,
            policy=ExportPolicy(k_min=self.secagg.k_min, clip_norm=self.clip_norm),
            stats=self.stats,
            mu=self.inner.mu,
            buffered=self.buffered,
            delay_aware=self.delay_aware,
            prekey=self.prekey,
            rebase_carry=self.rebase_carry,
            token_unit=self.token_unit,
            round_timeout_s=self.round_timeout_s,
            windows=self.windows,
        )

    def policy(self) -> Policy:
        """The egress allow-list that gates and verifier check every payload against."""
        return egress_policy(window=self.window, secagg=self.secagg, payloads=self.payloads)

    def to_canonical_bytes(self) -> bytes:
        """Canonical JSON (docs/audit.md): what is recorded, hashed and signed."""
        return canonical_json(_encode(self))

    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes."""
        return hashlib.sha256(self.to_canonical_bytes()).digest()

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> RunDeclaration:
        """The one parser. Refuses anything `to_canonical_bytes` would not write.

        Raises DeclarationError naming the field: unknown or missing keys, wrong types,
        values out of range, or an encoding that is not the canonical one.
        """
        try:
            obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeclarationError("declaration", f"got {exc}, want canonical JSON") from None
        if type(obj) is dict and "schema_version" in obj:  # before the fields a version names
            _check_schema_version(obj["schema_version"])
        declaration: RunDeclaration = _decode(obj, cls, "declaration")
        if declaration.to_canonical_bytes() != data:
            raise DeclarationError(
                "declaration",
                "got another encoding of a valid declaration, want the canonical one "
                "(sorted keys, no whitespace, UTF-8, floats as their shortest decimal string)",
            )
        return declaration


def _check_schema_version(version: object) -> None:
    if type(version) is not int or version != DECLARATION_SCHEMA_VERSION:
        raise DeclarationError(
            "declaration.schema_version",
            f"got {_show(version)}, want {DECLARATION_SCHEMA_VERSION} (the only schema this "
            "build reads)",
        )


def check_run_id(run_id: str) -> None:
    """Raises DeclarationError unless `run_id` can name a run (it seeds secure-aggregation
    graphs and appears in every party's logs)."""
    if not _RUN_ID.fullmatch(run_id):
        raise DeclarationError(
            "declaration.run_id", f"got {run_id!r}, want [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
        )


def egress_policy(
    *, window: WindowConfig, secagg: SecureAggregationConfig, payloads: PayloadAllowList
) -> Policy:
    """The allow-list that a declaration with these components states (the coordinator
    gates its own payloads with it before the model, and so the declaration, is known)."""
    return Policy(
        m_min=window.m_min,
        k_min=secagg.k_min,
        level1=secagg.level1,
        level2=secagg.level2,
        payloads=payloads,
    )


# --- canonical encoding -------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """The JSON value of a declaration part (see docs/audit.md for the rules)."""
    if isinstance(value, Enum):  # before int: an IntEnum is written by name
        return value.name if isinstance(value, int) else _encode(value.value)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_encode(k): _encode(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(_encode(v) for v in value)
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} in a declaration")


def _floats(value: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float):
        yield path, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _floats(getattr(value, f.name), f"{path}.{f.name}")


# --- the parser ---------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _show(raw: Any) -> str:
    text = json.dumps(raw, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _decode(raw: Any, hint: Any, path: str) -> Any:
    """`raw` (parsed JSON) as a value of type `hint`; raises DeclarationError at `path`."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _decode_object(raw, hint, path)
    if isinstance(hint, type) and issubclass(hint, Enum):
        by_name = issubclass(hint, int)
        members = {m.name if by_name else m.value: m for m in hint}
        if type(raw) is not str or raw not in members:
            raise DeclarationError(path, f"got {_show(raw)}, want one of {sorted(members)}")
        return members[raw]
    if hint in (bool, int, str):
        if type(raw) is not hint:
            want = {bool: "true or false", int: "an integer", str: "a string"}[hint]
            raise DeclarationError(path, f"got {_show(raw)}, want {want}")
        return raw
    if hint is float:
        return _decode_float(raw, path)
    if hint is bytes:
        if type(raw) is not str or not _HEX.fullmatch(raw):
            raise DeclarationError(path, f"got {_show(raw)}, want lowercase hex")
        return bytes.fromhex(raw)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (frozenset, tuple):
        if type(raw) is not list:
            raise DeclarationError(path, f"got {_show(raw)}, want a list")
        items = [_decode(v, args[0], f"{path}[{i}]") for i, v in enumerate(raw)]
        return frozenset(items) if origin is frozenset else tuple(items)
    if origin is Mapping:
        if type(raw) is not dict:
            raise DeclarationError(path, f"got {_show(raw)}, want an object")
        return {
            _decode(k, args[0], f"{path}.{k}"): _decode(v, args[1], f"{path}.{k}")
            for k, v in raw.items()
        }
    raise TypeError(f"{path}: a declaration cannot hold {hint!r}")


def _decode_float(raw: Any, path: str) -> float:
    want = "a finite float as its shortest decimal string, e.g. '0.7'"
    if type(raw) is not str:
        raise DeclarationError(path, f"got {_show(raw)}, want {want}")
    try:
        value = float(raw)
    except ValueError:
        raise DeclarationError(path, f"got {_show(raw)}, want {want}") from None
    if not math.isfinite(value) or repr(value) != raw:
        raise DeclarationError(path, f"got {_show(raw)}, want {want}")
    return value


def _decode_object(raw: Any, cls: type, path: str) -> Any:
    if type(raw) is not dict:
        raise DeclarationError(path, f"got {_show(raw)}, want an object")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise DeclarationError(f"{path}.{unknown[0]}", f"unknown key, want only {sorted(names)}")
    missing = [name for name in names if name not in raw]
    if missing:
        raise DeclarationError(f"{path}.{missing[0]}", "missing, want every field present")
    hints = _hints(cls)
    kwargs = {name: _decode(raw[name], hints[name], f"{path}.{name}") for name in names}
    try:
        return cls(**kwargs)
    except DeclarationError:
        raise
    except ValueError as exc:
        # Component checks say "WindowConfig.m_min: got 0, want ..."; name the field's path.
        named = re.match(rf"{cls.__name__}\.(\w+): (.*)", str(exc), re.DOTALL)
        if named and named[1] in raw:
            raise DeclarationError(f"{path}.{named[1]}", named[2]) from None
        raise DeclarationError(path, str(exc)) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DeclarationError("declaration", f"got key {key!r} twice, want each key once")
        out[key] = value
    return out
