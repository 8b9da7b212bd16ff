"""Staleness weighting of contributions: how much a delta computed ``tau`` versions ago counts.

A boundary (or device) that contributes a delta based on global version
``v - tau`` is down-weighted by ``s(tau)`` before masking, since a masked
vector cannot be re-weighted afterwards. Contributions staler than ``tau_max``
are dropped (``None``), never weighted to zero and summed.

Kinds (Xie et al. 2019, FedAsync; Nguyen et al. 2022, FedBuff):

- constant:   ``s(tau) = 1``
- polynomial: ``s(tau) = (1 + tau) ** -a``
- hinge:      ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a * (tau - b) + 1)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class StalenessKind(Enum):
    """The shape of the staleness function."""

    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    HINGE = "hinge"


@dataclass(frozen=True, kw_only=True)
class StalenessConfig:
    """Staleness function ``s(tau)`` and the cut-off ``tau_max`` beyond which a delta is dropped."""

    kind: StalenessKind = StalenessKind.POLYNOMIAL
    a: float = 0.5
    b: int = 4
    tau_max: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StalenessKind):
            raise ValueError(
                f"StalenessConfig.kind: got {self.kind!r}, want a StalenessKind "
                f"({', '.join(k.value for k in StalenessKind)})"
            )
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ValueError(f"StalenessConfig.a: got {self.a}, want a finite value >= 0")
        if self.b < 0:
            raise ValueError(f"StalenessConfig.b: got {self.b}, want >= 0 (the hinge knee)")
        if self.tau_max < 0:
            raise ValueError(f"StalenessConfig.tau_max: got {self.tau_max}, want >= 0")


def staleness_factor(tau: int, cfg: StalenessConfig) -> float | None:
    """``s(tau)`` in (0, 1], or ``None`` when ``tau > cfg.tau_max`` (drop the contribution).

    Raises ``ValueError`` for a negative staleness.
    """
    if tau < 0:
        raise ValueError(f"tau: got {tau}, want >= 0 (versions behind the current global)")
    if tau > cfg.tau_max:
        return None
    if cfg.kind is StalenessKind.CONSTANT:
        return 1.0
    if cfg.kind is StalenessKind.POLYNOMIAL:
        return float((1.0 + tau) ** -cfg.a)
    if tau <= cfg.b:
        return 1.0
    return 1.0 / (cfg.a * (tau - cfg.b) + 1.0)


def contribution_weight(
    tokens: int, tau: int, cfg: StalenessConfig, token_unit: float
) -> float | None:
    """``tokens / token_unit * s(tau)``, or ``None`` when the contribution is too stale.

    ``token_unit`` keeps weights in the range ``SecAggConfig.max_weight``
    allows (e.g. tokens per window at full participation). Raises
    ``ValueError`` for negative tokens, a non-positive unit, or negative tau.
    """
    if tokens < 0:
        raise ValueError(f"tokens: got {tokens}, want >= 0")
    if not (math.isfinite(token_unit) and token_unit > 0):
        raise ValueError(f"token_unit: got {token_unit}, want a finite value > 0")
    factor = staleness_factor(tau, cfg)
    if factor is None:
        return None
    return tokens / token_unit * factor
