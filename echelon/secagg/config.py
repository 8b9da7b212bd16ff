"""Configuration of one secure-aggregation level, shared by participants and aggregator.

All parties of a window must use equal configs: the fixed-point scale, the
threshold and the neighbour-graph degree are part of the protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from echelon.secagg.errors import ConfigError

#: Arithmetic is in Z_(2^32); decoded sums are two's-complement int32.
MODULUS_BITS = 32
#: Largest party id: ids travel as u32 and the Shamir x-coordinate is ``id + 1``.
MAX_PARTY_ID = 2**32 - 2


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Parameters of one secure-aggregation level.

    ``clip`` bounds each coordinate of the *unweighted* vector x; the
    participant encodes ``w * clip(x)`` with ``0 <= w <= max_weight``. The
    fixed-point scale is ``2**frac_bits``. No overflow is possible when every
    coordinate of the cohort sum, including the weight coordinate and one unit
    of rounding per participant, fits in a signed 32-bit integer:
    ``max_participants * (ceil(max_weight * max(clip, 1) * 2**frac_bits) + 1) < 2**31``.

    ``neighbours`` is the SecAgg+ graph degree. ``None`` picks it: the complete
    graph for cohorts of at most ``complete_graph_max`` parties, else an even
    degree ``2 * ceil(2 * log2(n))`` (O(log n), Bell et al. 2020). A degree of
    at least ``n - 1`` is the complete graph (Bonawitz et al. 2017).

    Each party's secrets are shared among its ``degree + 1`` holders (its
    neighbours and itself, as in Bonawitz et al. 2017) with threshold
    ``t = floor(threshold_fraction * (degree + 1)) + 1``, a strict majority of
    the holders (``2 t > degree + 1``). Each honest party signs one survivor list
    and releases one kind of share per peer, so at most one list can gather t
    signatures within a neighbourhood and the aggregator never obtains both
    secrets of a party (see docs/secure-aggregation.md for the exact condition
    when participants collude). In a complete graph of n parties a round
    survives up to ``n - t = ceil(n / 2) - 1`` dropouts with the default 0.5.
    """

    threshold_fraction: float = 0.5
    neighbours: int | None = None
    complete_graph_max: int = 32
    clip: float = 1.0
    frac_bits: int = 16
    max_weight: float = 16.0
    max_participants: int = 1024

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold_fraction < 1.0:
            raise ConfigError(
                f"SecAggConfig.threshold_fraction: got {self.threshold_fraction}, want a value "
                "in [0.5, 1) so that t is a strict majority of each party's share holders",
                expected="[0.5, 1)",
                found=self.threshold_fraction,
            )
        if self.neighbours is not None and self.neighbours < 2:
            raise ConfigError(
                f"SecAggConfig.neighbours: got {self.neighbours}, want None (automatic) or >= 2",
                expected=">= 2 or None",
                found=self.neighbours,
            )
        if self.complete_graph_max < 2:
            raise ConfigError(
                f"SecAggConfig.complete_graph_max: got {self.complete_graph_max}, want >= 2",
                expected=">= 2",
                found=self.complete_graph_max,
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(
                f"SecAggConfig.clip: got {self.clip}, want a finite value > 0",
                expected="> 0",
                found=self.clip,
            )
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(
                f"SecAggConfig.max_weight: got {self.max_weight}, want a finite value > 0",
                expected="> 0",
                found=self.max_weight,
            )
        if not 0 <= self.frac_bits <= 30:
            raise ConfigError(
                f"SecAggConfig.frac_bits: got {self.frac_bits}, want 0..30",
                expected="0..30",
                found=self.frac_bits,
            )
        if self.max_participants < 2:
            raise ConfigError(
                f"SecAggConfig.max_participants: got {self.max_participants}, want >= 2",
                expected=">= 2",
                found=self.max_participants,
            )
        worst = self.max_participants * (self.max_coordinate_units + 1)
        if worst >= 2 ** (MODULUS_BITS - 1):
            raise ConfigError(
                "SecAggConfig: the cohort sum can overflow Z_(2^32): max_participants * "
                f"(ceil(max_weight * max(clip, 1) * 2**frac_bits) + 1) = {worst} >= 2**31; "
                "lower frac_bits, clip, max_weight or max_participants",
                expected=f"< {2 ** (MODULUS_BITS - 1)}",
                found=worst,
            )

    @property
    def scale(self) -> float:
        """Fixed-point scale ``2**frac_bits``."""
        return float(2**self.frac_bits)

    @property
    def max_coordinate_units(self) -> int:
        """Largest magnitude, in fixed-point units, of one encoded coordinate before rounding."""
        return math.ceil(self.max_weight * max(self.clip, 1.0) * self.scale)

    def quantization_bound(self, contributors: int) -> float:
        """Worst-case absolute error of one decoded sum coordinate over ``contributors`` parties.

        Stochastic rounding moves each encoded coordinate by less than one unit
        ``2**-frac_bits``, so the decoded sum of ``sum_i w_i * clip(x_i)`` (and
        of ``sum_i w_i``) is off by less than ``contributors * 2**-frac_bits``.
        The error is unbiased; its standard deviation is at most
        ``sqrt(contributors) / 2 * 2**-frac_bits``. Clipping is not counted:
        the sum is of clipped values by definition.
        """
        return contributors / self.scale
