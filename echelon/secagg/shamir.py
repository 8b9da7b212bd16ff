"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Secrets are 32-byte strings (an X25519 private key, a self-mask seed) read as
big-endian integers below 2^256, far below the prime. A share is the value of a
random degree-(t-1) polynomial at ``x = party_id + 1``; any t shares give the
secret by Lagrange interpolation at 0, fewer reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from echelon.secagg.errors import LengthMismatch, ShareReconstructionError

PRIME = 2**521 - 1
#: Bytes of one share value (big-endian, fixed width).
SHARE_BYTES = 66
SECRET_BYTES = 32


def x_coordinate(party_id: int) -> int:
    """The evaluation point of a party: never 0, which is where the secret lives."""
    return party_id + 1


def split(secret: bytes, *, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` among ``holders`` (party ids) so that any ``threshold`` of them recover it.

    Raises ``LengthMismatch`` for a secret that is not 32 bytes and ``ValueError``
    when the threshold is not in ``1..len(holders)`` or holders repeat.
    """
    if len(secret) != SECRET_BYTES:
        raise LengthMismatch(
            f"secret: got {len(secret)} bytes, want {SECRET_BYTES}",
            expected=SECRET_BYTES,
            found=len(secret),
        )
    if len(set(holders)) != len(holders):
        raise ValueError(f"holders: got repeated ids in {sorted(holders)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold: got {threshold}, want 1..{len(holders)} (the holder count)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for holder in holders:
        x = x_coordinate(holder)
        value = 0
        for coefficient in reversed(coefficients):
            value = (value * x + coefficient) % PRIME
        shares[holder] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def reconstruct(shares: Mapping[int, bytes]) -> bytes:
    """Interpolate the secret at 0 from ``{holder party id: share}``.

    The caller passes exactly the shares to use (at least the threshold);
    with fewer, the result is an unrelated value, which callers detect by
    checking the secret against its public commitment. Raises
    ``LengthMismatch`` for a share of the wrong width and
    ``ShareReconstructionError`` for a result that does not fit 32 bytes.
    """
    points: list[tuple[int, int]] = []
    for holder, share in shares.items():
        if len(share) != SHARE_BYTES:
            raise LengthMismatch(
                f"share from party {holder}: got {len(share)} bytes, want {SHARE_BYTES}",
                expected=SHARE_BYTES,
                found=len(share),
            )
        points.append((x_coordinate(holder), int.from_bytes(share, "big") % PRIME))
    # Lagrange at 0 over one common denominator, so a single modular inverse is needed.
    numerators, denominators = [], []
    for i, (x_i, _) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        numerators.append(numerator)
        denominators.append(denominator)
    common = 1
    for denominator in denominators:
        common = common * denominator % PRIME
    total = 0
    for i, (_, y_i) in enumerate(points):
        others = 1
        for j, denominator in enumerate(denominators):
            if i != j:
                others = others * denominator % PRIME
        total = (total + y_i * numerators[i] * others) % PRIME
    secret = total * pow(common, -1, PRIME) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShareReconstructionError(
            "reconstructed secret does not fit 32 bytes: the shares are inconsistent",
            expected=f"< 2**{8 * SECRET_BYTES}",
            found=secret.bit_length(),
        )
    return secret.to_bytes(SECRET_BYTES, "big")
