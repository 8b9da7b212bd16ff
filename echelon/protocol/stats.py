"""A boundary's statistics as extra coordinates of its contribution vector, so that they
are masked with it and the coordinator learns only their weighted cohort sums.

A contribution is `x = [delta (d), s_1 .. s_k]`, each statistic scaled from its declared
range `[0, hi]` into `[0, clip]` (secure aggregation clips every coordinate of the
unweighted `x` to `clip`); the encoder multiplies `x` by the weight `w` and appends `w`.
From the sum the coordinator reads `sum w delta`, `sum w` and, per statistic, the weighted
mean `sum w s / sum w`. A statistic beyond its range is clamped to it (and the boundary
logs so): the range is part of the run's declaration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Stat(Enum):
    """The statistics a boundary contributes, in vector order."""

    DRIFT = "drift"  # ||delta|| / ||theta_v||
    DRIFT_SQ = "drift_sq"  # its square, for the cohort's RMS drift
    TRAIN_LOSS = "train_loss"
    DELTA_NORM = "delta_norm"  # ||delta|| after clipping, for the agreement ratio
    TOKENS = "tokens"


@dataclass(frozen=True, kw_only=True)
class StatRanges:
    """Declared upper bounds of each statistic (all are >= 0)."""

    drift: float = 1.0
    train_loss: float = 16.0
    delta_norm: float = 16.0
    tokens: float = 1e7

    def __post_init__(self) -> None:
        for name in ("drift", "train_loss", "delta_norm", "tokens"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"StatRanges.{name}: got {value}, want a finite bound > 0")

    def bound(self, stat: Stat) -> float:
        if stat is Stat.DRIFT_SQ:
            return self.drift**2
        return float(getattr(self, stat.value))


STATS: tuple[Stat, ...] = tuple(Stat)


@dataclass(frozen=True, kw_only=True)
class BoundaryStats:
    """One boundary's statistics of one contribution (never sent in the clear)."""

    drift: float
    train_loss: float
    delta_norm: float
    tokens: int

    def values(self) -> dict[Stat, float]:
        return {
            Stat.DRIFT: self.drift,
            Stat.DRIFT_SQ: self.drift**2,
            Stat.TRAIN_LOSS: self.train_loss,
            Stat.DELTA_NORM: self.delta_norm,
            Stat.TOKENS: float(self.tokens),
        }


@dataclass(frozen=True, kw_only=True)
class CohortStats:
    """Weighted means over a cohort (`sum w s / sum w`), decoded from the unmasked sum."""

    drift: float
    drift_rms: float
    train_loss: float
    delta_norm: float  # weighted mean ||delta||: sum w ||delta|| = delta_norm * sum w
    tokens: float  # weighted mean tokens per contribution


def contribution_vector(
    delta: np.ndarray, stats: BoundaryStats, ranges: StatRanges, clip: float
) -> np.ndarray:
    """`[delta, scaled stats]` as float32, each statistic clamped into its range."""
    scaled = [
        min(max(value, 0.0), ranges.bound(stat)) / ranges.bound(stat) * clip
        for stat, value in stats.values().items()
    ]
    if not all(math.isfinite(v) for v in scaled):
        raise ValueError(f"boundary statistics: got {stats}, want finite values")
    return np.concatenate([delta.astype(np.float32), np.asarray(scaled, dtype=np.float32)])


def split_sum(
    weighted_sum: np.ndarray, weight_sum: float, ranges: StatRanges, clip: float
) -> tuple[np.ndarray, CohortStats]:
    """Splits `sum w x` into `sum w delta` and the cohort's weighted-mean statistics."""
    k = len(STATS)
    head, tail = weighted_sum[:-k], weighted_sum[-k:]
    means = {
        stat: float(tail[i]) / weight_sum / clip * ranges.bound(stat) if weight_sum > 0 else 0.0
        for i, stat in enumerate(STATS)
    }
    stats = CohortStats(
        drift=means[Stat.DRIFT],
        drift_rms=math.sqrt(max(means[Stat.DRIFT_SQ], 0.0)),
        train_loss=means[Stat.TRAIN_LOSS],
        delta_norm=means[Stat.DELTA_NORM],
        tokens=means[Stat.TOKENS],
    )
    return head, stats
