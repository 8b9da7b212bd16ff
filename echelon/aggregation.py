"""Aggregation of weighted boundary contributions into the outer step's pseudo-gradient.

Every contribution is a (d+1)-vector: w_b * delta_b followed by w_b. With secure
aggregation on, the vectors are masked and `echelon.secagg.Aggregator` sums them;
with it off (a baseline), `PlainAggregator` sums the float vectors. Both keep one
O(d) accumulator and hand the outer step the same `WindowSum`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class AggregationError(ValueError):
    """A contribution that cannot be added (wrong length, duplicate, unknown, too late)."""


@dataclass(frozen=True)
class WindowSum:
    """sum_b w_b delta_b, sum_b w_b and who contributed."""

    weighted_sum: np.ndarray  # float64, length d
    weight_sum: float
    contributors: tuple[int, ...]

    def pseudo_gradient(self) -> np.ndarray:
        """g = sum w_b delta_b / sum w_b; raises AggregationError on a zero weight sum."""
        if not self.weight_sum > 0:
            raise AggregationError(f"weight sum: got {self.weight_sum}, want > 0")
        return (self.weighted_sum / self.weight_sum).astype(np.float32)


class PlainAggregator:
    """Sums float (d+1)-vectors in place; the no-secure-aggregation baseline."""

    def __init__(self, *, cohort: list[int] | tuple[int, ...], dim: int) -> None:
        self.cohort = frozenset(cohort)
        self.dim = dim
        self._acc = np.zeros(dim + 1, dtype=np.float64)
        self._contributors: list[int] = []
        self._fixed = False

    def add(self, party: int, vector: np.ndarray) -> None:
        """Adds a contribution; raises AggregationError before touching the sum on bad input."""
        if self._fixed:
            raise AggregationError(f"party {party}: contribution after the survivor set was fixed")
        if party not in self.cohort:
            raise AggregationError(f"party {party}: not in the cohort {sorted(self.cohort)}")
        if party in self._contributors:
            raise AggregationError(f"party {party}: duplicate contribution")
        if vector.shape != (self.dim + 1,):
            raise AggregationError(f"party {party}: length {vector.size}, want {self.dim + 1}")
        if not np.isfinite(vector).all():
            raise AggregationError(f"party {party}: contribution holds NaN or Inf")
        self._acc += vector
        self._contributors.append(party)

    def fix_survivors(self) -> list[int]:
        self._fixed = True
        return sorted(self._contributors)

    def finalize(self) -> WindowSum:
        return WindowSum(
            weighted_sum=self._acc[: self.dim].copy(),
            weight_sum=float(self._acc[self.dim]),
            contributors=tuple(sorted(self._contributors)),
        )
