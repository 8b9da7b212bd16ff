"""Configuration of the coordinator: the run it declares and how it drives windows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from echelon.controller import SyncControllerConfig
from echelon.outer import OuterConfig
from echelon.staleness import StalenessConfig
from echelon.window import WindowConfig


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
    """Which secure-aggregation levels are on, and their shared parameters."""

    level1: bool = True  # devices mask for one another inside each boundary
    level2: bool = True  # boundaries mask for one another; off = the plain baseline
    threshold_fraction: float = 0.5
    neighbours: int = 0  # SecAgg+ degree; 0 = complete graph
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


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    run_id: str = "echelon"
    windows: int = 0  # stop after this many completed windows; 0 = until stopped
    rpc_timeout_s: float = 30.0
    token_unit: float = 8192.0  # w_b = tokens / token_unit * s(tau)
    idle_poll_s: float = 0.5
    abort_backoff_s: float = 2.0  # pause after an aborted window before opening the next
    inner: InnerHyper = field(default_factory=InnerHyper)
    window: WindowConfig = field(default_factory=WindowConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    delay_aware: bool = False  # Echelon-DA: boundaries keep training while a window is in flight
    adaptive_h: bool = False  # the drift-aware sync controller picks H (and mu) per window
    controller: SyncControllerConfig = field(default_factory=SyncControllerConfig)

    def __post_init__(self) -> None:
        if self.windows < 0:
            raise ValueError(f"CoordinatorConfig.windows: got {self.windows}, want >= 0")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"CoordinatorConfig.rpc_timeout_s: got {self.rpc_timeout_s}, want > 0")
        if not self.token_unit > 0:
            raise ValueError(f"CoordinatorConfig.token_unit: got {self.token_unit}, want > 0")

    def declared(self, model: dict[str, Any]) -> dict[str, Any]:
        """The run's declared settings besides the policy (floats as decimal strings, since
        the audit log's canonical JSON holds integers only)."""
        body = {
            "run_id": self.run_id,
            "model": model,
            "inner": asdict(self.inner),
            "window": asdict(self.window),
            "outer": asdict(self.outer),
            "secagg": asdict(self.secagg),
            "staleness": asdict(self.staleness),
            "adaptive_h": self.adaptive_h,
            "delay_aware": self.delay_aware,
            "controller": asdict(self.controller),
            "token_unit": self.token_unit,
        }
        declared: dict[str, Any] = _ints_and_strings(body)
        return declared


def _ints_and_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _ints_and_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_ints_and_strings(v) for v in value]
    if isinstance(value, Enum):
        return _ints_and_strings(value.value)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return repr(value)
    return str(value)
