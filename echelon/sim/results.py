"""What a simulated run returns: the global model's trajectory over tokens, bytes crossing
boundaries, simulated wall-clock and syncs, and readings of it at a budget or a target loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    """The global model after one committed version (or one local round)."""

    tokens: int
    bytes: int
    wall_s: float
    syncs: int
    loss: float
    inner_steps: int
    reason: str
    comm_share: float
    staleness: int = 0


@dataclass(frozen=True)
class RunResult:
    strategy: str
    seed: int
    points: tuple[Point, ...]


def value_at(result: RunResult, axis: str, budget: float) -> float:
    """Loss at `budget` on `axis` (tokens, bytes, wall_s, syncs), linear between evaluated
    versions; the last loss when the run never spent the budget."""
    xs = np.array([getattr(p, axis) for p in result.points], dtype=np.float64)
    ys = np.array([p.loss for p in result.points], dtype=np.float64)
    if budget >= xs[-1]:
        return float(ys[-1])
    return float(np.interp(budget, xs, ys))


def time_to_target(result: RunResult, target: float) -> float:
    """First simulated time the global loss reaches `target` (linear between versions);
    infinity when it never does."""
    prev = result.points[0]
    for p in result.points[1:]:
        if p.loss <= target:
            if prev.loss <= target or prev.loss == p.loss:
                return p.wall_s
            frac = (prev.loss - target) / (prev.loss - p.loss)
            return prev.wall_s + frac * (p.wall_s - prev.wall_s)
        prev = p
    return math.inf
