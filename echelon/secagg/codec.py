"""Fixed-point codec between weighted float vectors and Z_(2^32).

A participant's vector x (length d) and contribution weight w become one
uint32 vector of length d + 1: ``w * clip(x, -clip, clip) * 2**frac_bits`` and
``w * 2**frac_bits``, each stochastically rounded to an integer and stored in
two's complement. Sums of such vectors (mod 2^32) decode to
``(sum_i w_i * clip(x_i), sum_i w_i)`` with an absolute error below
``n * 2**-frac_bits`` per coordinate (see ``SecAggConfig.quantization_bound``);
``SecAggConfig`` guarantees the sum cannot overflow.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from echelon.secagg.config import SecAggConfig
from echelon.secagg.errors import InvalidContribution, LengthMismatch

#: Coordinates encoded per pass: the float64 scratch buffers stay in cache.
_CHUNK = 1 << 15


def _encode_into(
    out: NDArray[np.int32],
    values: NDArray[np.floating] | NDArray[np.integer],
    *,
    clip: float,
    factor: float,
    rng: np.random.Generator,
) -> None:
    """``out = stochastic_round(factor * clip(values))``, chunk by chunk in reused buffers."""
    scaled = np.empty(min(_CHUNK, values.shape[0]), dtype=np.float64)
    floor = np.empty_like(scaled)
    uniform = np.empty_like(scaled)
    round_up = np.empty(scaled.shape[0], dtype=bool)
    for start in range(0, values.shape[0], _CHUNK):
        count = min(_CHUNK, values.shape[0] - start)
        x, f, u, up = scaled[:count], floor[:count], uniform[:count], round_up[:count]
        np.clip(values[start : start + count], -clip, clip, out=x, casting="unsafe")
        x *= factor
        np.floor(x, out=f)
        x -= f
        rng.random(out=u)
        np.less(u, x, out=up)
        f += up
        np.copyto(out[start : start + count], f, casting="unsafe")


def encode(
    vector: NDArray[np.floating] | NDArray[np.integer],
    weight: float,
    config: SecAggConfig,
    rng: np.random.Generator,
) -> NDArray[np.uint32]:
    """Encode ``weight * clip(vector)`` and ``weight`` as a uint32 vector of length d + 1.

    Raises ``InvalidContribution`` when the vector is not 1-D or holds NaN/Inf,
    or when the weight is not finite or outside ``[0, config.max_weight]``.
    """
    array = np.asarray(vector)
    if array.ndim != 1:
        raise InvalidContribution(
            f"vector: got {array.ndim} dimensions, want 1 (flatten it first)",
            expected=1,
            found=array.ndim,
        )
    if not (math.isfinite(weight) and 0.0 <= weight <= config.max_weight):
        raise InvalidContribution(
            f"weight: got {weight}, want a finite value in [0, {config.max_weight}] "
            "(SecAggConfig.max_weight)",
            expected=(0.0, config.max_weight),
            found=weight,
        )
    if not np.isfinite(array).all():
        raise InvalidContribution(
            "vector: holds NaN or Inf; refuse to encode it", expected="finite", found="non-finite"
        )
    encoded = np.empty(array.shape[0] + 1, dtype=np.uint32)
    signed = encoded.view(np.int32)
    _encode_into(signed[:-1], array, clip=config.clip, factor=weight * config.scale, rng=rng)
    # The weight, rounded the same way, unclipped (it was checked against max_weight).
    _encode_into(signed[-1:], np.array([weight]), clip=math.inf, factor=config.scale, rng=rng)
    return encoded


def decode(
    encoded_sum: NDArray[np.uint32], config: SecAggConfig
) -> tuple[NDArray[np.float64], float]:
    """Decode a sum of encoded vectors into ``(weighted_sum, weight_sum)``.

    Raises ``LengthMismatch`` when the input is shorter than the weight coordinate.
    """
    if encoded_sum.ndim != 1 or encoded_sum.shape[0] < 1:
        raise LengthMismatch(
            f"encoded sum: got shape {encoded_sum.shape}, want (d + 1,) with d >= 0",
            expected="(d + 1,)",
            found=encoded_sum.shape,
        )
    signed = encoded_sum.view(np.int32).astype(np.float64)
    signed /= config.scale
    return signed[:-1], float(signed[-1])
