"""Level-2 aggregation of one simulated window: the real `echelon.secagg` protocol run in
process on the boundaries' weighted vectors (keys, encrypted shares, masking, survivor-list
signatures, unmasking, with non-contributors handled as dropouts), or the plain float sum of
the no-secure-aggregation baselines; both report the bytes each boundary sent and received.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.aggregation import PlainAggregator, WindowSum
from echelon.secagg import Aggregator, Participant, SecAggConfig, SecAggError

#: Fixed point with 2^-20 resolution; 16 parties of weight <= 16 cannot overflow Z_(2^32).
SIM_SECAGG = SecAggConfig(clip=1.0, frac_bits=20, max_weight=16.0, max_participants=16)


@dataclass(frozen=True)
class KeyRoundBytes:
    """Bytes per boundary of the rounds before collection (advertise, shares) and after
    (survivor-list signature, unmasking shares), up and down."""

    setup_up: int
    setup_down: int
    finish_up: int
    finish_down: int


@dataclass(frozen=True)
class AggregateOutcome:
    """The window's sum, or None when the protocol aborted; bytes per boundary."""

    total: WindowSum | None
    rounds: dict[int, KeyRoundBytes]
    reason: str


class SecureAggregation:
    """Runs level-2 secure aggregation for simulated windows; one identity key per boundary."""

    def __init__(self, boundaries: int, config: SecAggConfig = SIM_SECAGG) -> None:
        self.config = config
        self._identities = {b: Ed25519PrivateKey.generate() for b in range(boundaries)}
        self._public = {b: k.public_key() for b, k in self._identities.items()}

    def aggregate(
        self,
        *,
        window: int,
        cohort: Sequence[int],
        vectors: Mapping[int, np.ndarray],
        weights: Mapping[int, float],
        rng: np.random.Generator,
    ) -> AggregateOutcome:
        """Masks each contributor's `weights[b] * vectors[b]`, drops cohort members without a
        vector, unmasks the sum. The sum is exact up to fixed-point rounding (seeded by `rng`);
        masks are cryptographic and cancel, so results do not depend on key randomness."""
        dim = len(next(iter(vectors.values())))
        seed = f"sim/{window}".encode()
        parts = {
            b: Participant(
                party_id=b,
                window=window,
                cohort=cohort,
                identity=self._identities[b],
                peer_identities=self._public,
                config=self.config,
                graph_seed=seed,
            )
            for b in cohort
        }
        agg = Aggregator(
            window=window,
            cohort=cohort,
            dim=dim,
            config=self.config,
            graph_seed=seed,
            peer_identities=self._public,
        )
        up = dict.fromkeys(cohort, 0)
        down = dict.fromkeys(cohort, 0)
        fin_up = dict.fromkeys(cohort, 0)
        fin_down = dict.fromkeys(cohort, 0)
        try:
            for b, p in parts.items():
                ad = p.advertise()
                up[b] += len(ad.to_bytes())
                agg.add_advertisement(b, ad)
            ads = agg.close_advertisements()
            relayed = sum(len(a.to_bytes()) for a in ads.values())
            for b, p in parts.items():
                down[b] += relayed
                shares = p.share_keys(ads)
                up[b] += sum(len(s.to_bytes()) for s in shares.values())
                agg.add_shares(b, shares)
            for b, routed in agg.route_shares().items():
                down[b] += sum(len(s.to_bytes()) for s in routed)
                parts[b].receive_shares(routed)
            for b in sorted(vectors):
                agg.add_masked(b, parts[b].mask(vectors[b], weights[b], rng))
            survivors = agg.fix_survivors()
            for b in survivors:
                sig = parts[b].sign_survivors(survivors)
                fin_up[b] += len(sig)
                agg.add_survivor_signature(b, sig)
            signatures = agg.survivor_signatures()
            for b in survivors:
                fin_down[b] += sum(map(len, signatures.values()))
                shares_out = parts[b].unmask(survivors, signatures)
                fin_up[b] += len(shares_out.to_bytes())
                agg.add_unmasking_shares(b, shares_out)
            result = agg.finalize()
            aborted = None
        except SecAggError as exc:
            aborted = f"secure aggregation aborted: {exc}"
        rounds = {b: KeyRoundBytes(up[b], down[b], fin_up[b], fin_down[b]) for b in cohort}
        if aborted is not None:
            return AggregateOutcome(None, rounds, aborted)
        total = WindowSum(
            weighted_sum=result.weighted_sum,
            weight_sum=result.weight_sum,
            contributors=tuple(result.contributors),
        )
        return AggregateOutcome(total, rounds, f"unmasked {len(result.contributors)}")


def plain_aggregate(
    cohort: Sequence[int], vectors: Mapping[int, np.ndarray], weights: Mapping[int, float]
) -> AggregateOutcome:
    """The baselines' sum of float (d+1)-vectors `[w_b * delta_b, w_b]`; no key rounds."""
    dim = len(next(iter(vectors.values())))
    agg = PlainAggregator(cohort=tuple(cohort), dim=dim)
    for b in sorted(vectors):
        w = weights[b]
        agg.add(b, np.append(vectors[b].astype(np.float64) * w, w))
    agg.fix_survivors()
    rounds = {b: KeyRoundBytes(0, 0, 0, 0) for b in cohort}
    return AggregateOutcome(agg.finalize(), rounds, f"summed {len(vectors)}")
