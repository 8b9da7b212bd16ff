"""Training strategies as configurations of one window machinery, never as separate programs.

A `Strategy` composes: how windows close (`SyncMode`, buffer K, deadline), how contributions
are weighted (`StalenessConfig`), the outer optimizer (`OuterConfig`; FedAvg is lr 1 without
momentum), the proximal weight mu, whether secure aggregation masks the boundary vectors,
whether the drift-aware controller adapts H, whether boundaries keep training while a window's
communication is in flight and re-base on arrival (delay-aware, with how much of the in-flight
progress carries over), whether the next window's secure-aggregation key set-up overlaps this
window's unmasking (pre-keying), and the frozen-A LoRA mode. `STRATEGIES` names the
eight strategies of the contest; `strategy(name, **overrides)` derives a tuned variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from echelon.controller import SyncControllerConfig
from echelon.outer import OuterConfig
from echelon.staleness import StalenessConfig, StalenessKind


class SyncMode(Enum):
    """How a window closes and whether a boundary waits for the window's result."""

    LOCAL = "local"  # no exchange across boundaries at all
    SYNC = "sync"  # the window waits for its whole cohort (up to a long deadline)
    SEMI_ASYNC = "semi_async"  # closes when all answered or at the deadline; late ones are stale
    BUFFERED = "buffered"  # closes at K contributions; boundaries restart at once (FedBuff)


FEDAVG_OUTER = OuterConfig(lr=1.0, momentum=0.0, nesterov=False)
DILOCO_OUTER = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """One point in the strategy space; every field is a knob of the shared window machinery."""

    name: str
    mode: SyncMode
    inner_steps: int = 16
    inner_lr: float = 3e-3
    mu: float = 0.0
    outer: OuterConfig = FEDAVG_OUTER
    staleness: StalenessConfig = field(
        default_factory=lambda: StalenessConfig(kind=StalenessKind.CONSTANT)
    )
    buffer_k: int = 0
    deadline_factor: float = 4.0
    secure_aggregation: bool = False
    controller: SyncControllerConfig | None = None
    delay_aware: bool = False
    rebase_carry: float = 1.0
    prekey: bool = False
    frozen_a: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Strategy.name: want a non-empty name")
        if self.inner_steps < 1 or not self.inner_lr > 0 or self.mu < 0:
            raise ValueError(
                f"Strategy {self.name}: got inner_steps={self.inner_steps}, "
                f"inner_lr={self.inner_lr}, mu={self.mu}; want >= 1, > 0, >= 0"
            )
        if not self.deadline_factor > 1.0:
            raise ValueError(
                f"Strategy {self.name}.deadline_factor: got {self.deadline_factor}, want > 1 "
                "(the deadline is this multiple of the window's nominal time)"
            )
        if (self.mode is SyncMode.BUFFERED) != (self.buffer_k > 0):
            raise ValueError(
                f"Strategy {self.name}: mode {self.mode.value} with buffer_k={self.buffer_k}; "
                "want buffer_k >= 2 exactly for mode 'buffered'"
            )
        if self.mode is SyncMode.BUFFERED and self.buffer_k < 2:
            raise ValueError(f"Strategy {self.name}.buffer_k: got {self.buffer_k}, want >= 2")
        if self.mode is SyncMode.LOCAL and (
            self.secure_aggregation or self.controller is not None or self.delay_aware
        ):
            raise ValueError(
                f"Strategy {self.name}: mode 'local' exchanges nothing; want "
                "secure_aggregation, controller and delay_aware off"
            )
        carry = self.rebase_carry
        if not 0.0 < carry <= 1.0 or (carry != 1.0 and not self.delay_aware):
            raise ValueError(
                f"Strategy {self.name}.rebase_carry: got {self.rebase_carry}; want 0 < carry <= 1,"
                " and 1 unless delay_aware"
            )
        if self.prekey and not self.secure_aggregation:
            raise ValueError(
                f"Strategy {self.name}.prekey: want secure_aggregation on (it pipelines the next "
                "window's key set-up with this window's unmasking)"
            )
        if self.delay_aware and self.mode is SyncMode.BUFFERED:
            raise ValueError(
                f"Strategy {self.name}: delay_aware needs boundaries that wait for a window's "
                "result (mode 'sync' or 'semi_async'); buffered boundaries never wait"
            )

    @property
    def exchanges(self) -> bool:
        return self.mode is not SyncMode.LOCAL


_ECHELON_STALENESS = StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=4)
_CONTROLLER = SyncControllerConfig(h_min=2, h_max=16)

_ECHELON = Strategy(
    name="echelon",
    mode=SyncMode.SEMI_ASYNC,
    outer=DILOCO_OUTER,
    staleness=_ECHELON_STALENESS,
    deadline_factor=1.5,
    secure_aggregation=True,
    prekey=True,  # as the services run it: three round trips a window
    inner_steps=4,
    controller=_CONTROLLER,
)
_ECHELON_DA = replace(_ECHELON, name="echelon-da", delay_aware=True)

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(name="local-only", mode=SyncMode.LOCAL),
        Strategy(name="fedavg", mode=SyncMode.SYNC, inner_steps=2),
        Strategy(name="fedprox", mode=SyncMode.SYNC, inner_steps=2, mu=1e-2),
        Strategy(
            name="fedbuff",
            mode=SyncMode.BUFFERED,
            inner_steps=4,
            buffer_k=2,
            staleness=StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=8),
        ),
        Strategy(name="diloco", mode=SyncMode.SYNC, inner_steps=4, outer=DILOCO_OUTER),
        Strategy(
            name="diloco-sa",
            mode=SyncMode.SYNC,
            inner_steps=4,
            outer=DILOCO_OUTER,
            secure_aggregation=True,
        ),
        _ECHELON,
        _ECHELON_DA,
    )
}


def strategy(name: str, **overrides: Any) -> Strategy:
    """The named strategy with fields replaced; `outer_lr`/`outer_momentum` set the outer step,
    `grow_h=False` caps the controller at the first H (it may then only shorten H).

    Raises:
        KeyError: `name` is not in `STRATEGIES`.
        ValueError: an override is invalid for this strategy.
    """
    if name not in STRATEGIES:
        raise KeyError(f"strategy {name!r}: want one of {', '.join(STRATEGIES)}")
    base = STRATEGIES[name]
    outer_lr = overrides.pop("outer_lr", None)
    outer_momentum = overrides.pop("outer_momentum", None)
    if outer_lr is not None or outer_momentum is not None:
        momentum = base.outer.momentum if outer_momentum is None else float(outer_momentum)
        overrides["outer"] = OuterConfig(
            lr=base.outer.lr if outer_lr is None else float(outer_lr),
            momentum=momentum,
            nesterov=base.outer.nesterov and momentum > 0,
        )
    grow_h = overrides.pop("grow_h", None)
    if grow_h is not None and not grow_h:
        if base.controller is None:
            raise ValueError(f"Strategy {name}: grow_h=False needs a controller; it has none")
        h = int(overrides.get("inner_steps", base.inner_steps))
        ctl = base.controller
        overrides["controller"] = replace(ctl, h_max=h, h_min=min(ctl.h_min, h))
    return replace(base, **overrides)
