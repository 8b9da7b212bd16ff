"""In-process driver of one secure-aggregation window, shared by the secagg tests.

It plays the relay honestly unless a test intervenes between steps, so each
test states only the deviation it is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.secagg import (
    AggregateResult,
    Aggregator,
    KeyAdvertisement,
    Participant,
    SecAggConfig,
)

GRAPH_SEED = b"test-graph-seed"


def make_identities(
    cohort: Iterable[int],
) -> tuple[dict[int, Ed25519PrivateKey], dict[int, Ed25519PublicKey]]:
    private = {party: Ed25519PrivateKey.generate() for party in cohort}
    return private, {party: key.public_key() for party, key in private.items()}


@dataclass
class Window:
    """Participants and aggregator of one window, with the messages relayed so far."""

    window: int
    cohort: list[int]
    dim: int
    config: SecAggConfig
    identities: dict[int, Ed25519PrivateKey]
    public: dict[int, Ed25519PublicKey]
    participants: dict[int, Participant]
    aggregator: Aggregator
    ads: dict[int, KeyAdvertisement] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)


def open_window(
    cohort: Sequence[int],
    dim: int,
    *,
    window: int = 1,
    config: SecAggConfig | None = None,
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
) -> Window:
    config = config or SecAggConfig()
    if identities is None:
        private, public = make_identities(cohort)
    else:
        private = dict(identities)
        public = {party: key.public_key() for party, key in private.items()}
    participants = {
        party: Participant(
            party_id=party,
            window=window,
            cohort=cohort,
            identity=private[party],
            peer_identities=public,
            config=config,
            graph_seed=GRAPH_SEED,
        )
        for party in cohort
    }
    aggregator = Aggregator(
        window=window,
        cohort=cohort,
        dim=dim,
        config=config,
        graph_seed=GRAPH_SEED,
        peer_identities=public,
    )
    return Window(window, list(cohort), dim, config, private, public, participants, aggregator)


def exchange_keys(w: Window, *, silent: Iterable[int] = ()) -> None:
    """Advertise and share keys; parties in ``silent`` vanish before advertising."""
    gone = set(silent)
    for party, participant in w.participants.items():
        if party not in gone:
            w.aggregator.add_advertisement(party, participant.advertise())
    w.ads = w.aggregator.close_advertisements()
    for party, participant in w.participants.items():
        if party not in gone:
            w.aggregator.add_shares(party, participant.share_keys(w.ads))
    routed = w.aggregator.route_shares()
    for party, shares in routed.items():
        w.participants[party].receive_shares(shares)


def submit(
    w: Window,
    vectors: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    rng: np.random.Generator,
    *,
    drop_before_mask: Iterable[int] = (),
    drop_after_mask: Iterable[int] = (),
) -> None:
    before, after = set(drop_before_mask), set(drop_after_mask)
    for party in vectors:
        if party in before:
            continue
        masked = w.participants[party].mask(vectors[party], weights[party], rng)
        w.masked[party] = masked
        if party not in after:
            w.aggregator.add_masked(party, masked)


def unmask(
    w: Window, *, unsigned: Iterable[int] = (), withheld: Iterable[int] = ()
) -> AggregateResult:
    """Consistency check and unmasking.

    Survivors in ``unsigned`` vanish before signing the survivor list, those in
    ``withheld`` after signing it but before releasing their shares.
    """
    no_signature, no_shares = set(unsigned), set(unsigned) | set(withheld)
    survivors = w.aggregator.fix_survivors()
    for party in survivors:
        if party not in no_signature:
            signature = w.participants[party].sign_survivors(survivors)
            w.aggregator.add_survivor_signature(party, signature)
    signatures = w.aggregator.survivor_signatures()
    for party in survivors:
        if party not in no_shares:
            shares = w.participants[party].unmask(survivors, signatures)
            w.aggregator.add_unmasking_shares(party, shares)
    return w.aggregator.finalize()


def expected_sums(
    vectors: Mapping[int, np.ndarray],
    weights: Mapping[int, float],
    contributors: Iterable[int],
    clip: float,
) -> tuple[np.ndarray, float]:
    parties = list(contributors)
    dim = len(next(iter(vectors.values())))
    total = np.zeros(dim, dtype=np.float64)
    for party in parties:
        total += weights[party] * np.clip(vectors[party].astype(np.float64), -clip, clip)
    return total, float(sum(weights[party] for party in parties))
