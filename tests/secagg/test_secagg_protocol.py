"""End-to-end secure aggregation: masks cancel, also with dropouts; rounds abort cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_harness import exchange_keys, expected_sums, open_window, submit, unmask

from echelon.secagg import (
    AbortedRound,
    AggregateResult,
    AggregatorStage,
    EncryptedShare,
    KeyAdvertisement,
    LengthMismatch,
    SecAggConfig,
    UnmaskingShares,
    graph_degree,
)


def _complete_graph_threshold(n: int) -> int:
    # Shared among all n parties (n - 1 neighbours and the party itself): a strict majority.
    return n // 2 + 1


def _max_dropouts(n: int) -> int:
    # Every secret that is needed keeps t surviving holders exactly when n - drops >= t.
    return n - _complete_graph_threshold(n)


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(2, 8))
    cohort = sorted(draw(st.sets(st.integers(0, 50), min_size=n, max_size=n)))
    dim = draw(st.integers(1, 12))
    # Each needed secret needs t surviving holders (itself included for a survivor's
    # seed): at most n - t = ceil(n / 2) - 1 parties may drop.
    drops = draw(st.integers(0, _max_dropouts(n)))
    dropped = draw(st.permutations(cohort))[:drops]
    before = draw(st.integers(0, drops))
    values = st.floats(-3.0, 3.0, allow_nan=False, width=32)
    vectors = {p: np.array(draw(st.lists(values, min_size=dim, max_size=dim))) for p in cohort}
    weights = {p: draw(st.floats(0.0, 16.0)) for p in cohort}
    return {
        "cohort": cohort,
        "dim": dim,
        "vectors": vectors,
        "weights": weights,
        "before": dropped[:before],
        "after": dropped[before:],
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds())
def test_unmasked_sum_matches_weighted_sum_with_dropouts(case: dict[str, object]) -> None:
    cohort: list[int] = case["cohort"]  # type: ignore[assignment]
    vectors: dict[int, np.ndarray] = case["vectors"]  # type: ignore[assignment]
    weights: dict[int, float] = case["weights"]  # type: ignore[assignment]
    w = open_window(cohort, int(case["dim"]))  # type: ignore[call-overload]
    exchange_keys(w)
    rng = np.random.default_rng(case["seed"])  # type: ignore[arg-type]
    submit(
        w,
        vectors,
        weights,
        rng,
        drop_before_mask=case["before"],  # type: ignore[arg-type]
        drop_after_mask=case["after"],  # type: ignore[arg-type]
    )

    result = unmask(w)

    gone = set(case["before"]) | set(case["after"])  # type: ignore[call-overload]
    survivors = [p for p in cohort if p not in gone]
    want_sum, want_weight = expected_sums(vectors, weights, survivors, w.config.clip)
    assert result.contributors == survivors
    assert result.quantization_bound == len(survivors) / 2**w.config.frac_bits
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def _assert_sum(
    result: AggregateResult,
    vectors: dict[int, np.ndarray],
    weights: dict[int, float],
    contributors: list[int],
) -> None:
    want_sum, want_weight = expected_sums(vectors, weights, contributors, 1.0)
    assert result.contributors == contributors
    assert result.quantization_bound == len(contributors) / 2**16
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def _three_party_inputs(seed: int) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    rng = np.random.default_rng(seed)
    return {p: rng.uniform(-2, 2, size=6) for p in (0, 1, 2)}, {0: 1.0, 1: 2.5, 2: 0.75}


def test_three_parties_share_two_of_three_including_themselves() -> None:
    w = open_window([0, 1, 2], 6)
    graph = w.aggregator.graph
    assert all(graph.holders(p) == {0, 1, 2} and graph.threshold(p) == 2 for p in (0, 1, 2))
    for p, participant in w.participants.items():
        w.aggregator.add_advertisement(p, participant.advertise())
    ads = w.aggregator.close_advertisements()

    bundles = {p: participant.share_keys(ads) for p, participant in w.participants.items()}

    # A party's own shares are kept, never encrypted: each bundle is for its two neighbours.
    assert {p: sorted(bundle) for p, bundle in bundles.items()} == {0: [1, 2], 1: [0, 2], 2: [0, 1]}


@pytest.mark.parametrize("dropped", [0, 1, 2])
def test_three_parties_one_drops_before_masking(dropped: int) -> None:
    w = open_window([0, 1, 2], 6)
    exchange_keys(w)
    vectors, weights = _three_party_inputs(10 + dropped)
    submit(w, vectors, weights, np.random.default_rng(dropped), drop_before_mask=[dropped])

    result = unmask(w)

    _assert_sum(result, vectors, weights, [p for p in (0, 1, 2) if p != dropped])


@pytest.mark.parametrize("dropped", [0, 1, 2])
@pytest.mark.parametrize("when", ["before signing", "after signing"])
def test_three_parties_one_drops_after_masking(dropped: int, when: str) -> None:
    # Its masked vector arrived, so it is a survivor, but it sends no unmasking shares: the
    # other two release their shares of its seed (t = 2) and their own seed shares.
    w = open_window([0, 1, 2], 6)
    exchange_keys(w)
    vectors, weights = _three_party_inputs(20 + dropped)
    submit(w, vectors, weights, np.random.default_rng(dropped))

    if when == "before signing":
        result = unmask(w, unsigned=[dropped])
    else:
        result = unmask(w, withheld=[dropped])

    _assert_sum(result, vectors, weights, [0, 1, 2])


def test_three_parties_one_drops_after_advertising_before_sharing() -> None:
    w = open_window([0, 1, 2], 6)
    for p, participant in w.participants.items():
        w.aggregator.add_advertisement(p, participant.advertise())
    ads = w.aggregator.close_advertisements()
    for p in (0, 1):  # party 2 advertised, then vanished before sending its shares
        w.aggregator.add_shares(p, w.participants[p].share_keys(ads))
    for p, shares in w.aggregator.route_shares().items():
        w.participants[p].receive_shares(shares)  # one neighbour + itself = t = 2
    assert w.participants[0].mask_peers == {1}
    vectors, weights = _three_party_inputs(30)
    submit(w, {p: vectors[p] for p in (0, 1)}, weights, np.random.default_rng(30))

    result = unmask(w)

    _assert_sum(result, vectors, weights, [0, 1])


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
@pytest.mark.parametrize("stage", ["before masking", "after masking", "withheld shares"])
def test_complete_graph_tolerates_ceil_half_minus_one_dropouts(n: int, stage: str) -> None:
    # t = floor(n / 2) + 1 of n holders: n - t = ceil(n / 2) - 1 parties may drop (1, 1, 2, 2, 3).
    cohort = list(range(n))
    most = _max_dropouts(n)
    assert most == (n + 1) // 2 - 1 and most >= 1
    gone = cohort[n - most :]  # the highest ids: both pairwise-mask signs are exercised
    w = open_window(cohort, 5)
    exchange_keys(w)
    rng = np.random.default_rng(n)
    vectors = {p: rng.uniform(-1, 1, size=5) for p in cohort}
    weights = {p: float(p + 1) for p in cohort}

    if stage == "before masking":
        submit(w, vectors, weights, rng, drop_before_mask=gone)
        result = unmask(w)
        contributors = [p for p in cohort if p not in gone]
    elif stage == "after masking":
        submit(w, vectors, weights, rng, drop_after_mask=gone)
        result = unmask(w)
        contributors = [p for p in cohort if p not in gone]
    else:  # vectors arrived, but these survivors release no unmasking shares
        submit(w, vectors, weights, rng)
        result = unmask(w, withheld=gone)
        contributors = cohort

    _assert_sum(result, vectors, weights, contributors)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_complete_graph_aborts_one_dropout_past_the_bound(n: int) -> None:
    cohort = list(range(n))
    gone = cohort[: _max_dropouts(n) + 1]
    w = open_window(cohort, 5)
    exchange_keys(w)
    rng = np.random.default_rng(n)
    vectors = {p: rng.uniform(-1, 1, size=5) for p in cohort}
    submit(w, vectors, dict.fromkeys(cohort, 1.0), rng, drop_after_mask=gone)
    before = w.aggregator.masked_total.copy()

    with pytest.raises(AbortedRound) as caught:
        w.aggregator.fix_survivors()

    assert (caught.value.expected, caught.value.found) == (n // 2 + 1, n - len(gone))
    np.testing.assert_array_equal(w.aggregator.masked_total, before)


def test_party_silent_from_the_start_is_left_out() -> None:
    cohort = [1, 2, 3, 4, 5]
    w = open_window(cohort, 6)
    exchange_keys(w, silent=[5])
    rng = np.random.default_rng(1)
    vectors = {p: rng.normal(size=6) for p in cohort[:4]}
    weights = {p: 1.5 for p in cohort[:4]}
    submit(w, vectors, weights, rng)

    result = unmask(w)

    want_sum, want_weight = expected_sums(vectors, weights, cohort[:4], w.config.clip)
    assert result.contributors == [1, 2, 3, 4]
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def test_secagg_plus_neighbour_graph_with_dropouts() -> None:
    cohort = list(range(12))
    config = SecAggConfig(neighbours=4)
    w = open_window(cohort, 9, config=config)
    assert graph_degree(12, config) == 4
    assert all(len(w.aggregator.graph.of(p)) == 4 for p in cohort)
    exchange_keys(w)
    rng = np.random.default_rng(2)
    vectors = {p: rng.uniform(-2, 2, size=9) for p in cohort}
    weights = {p: float(p % 3 + 1) for p in cohort}
    graph = w.aggregator.graph

    def recoverable(gone: set[int]) -> bool:
        alive = set(cohort) - gone
        return all(len(graph.holders(p) & alive) >= graph.threshold(p) for p in cohort)

    # Two dropouts that leave every secret t = 3 of its 5 holders (4 neighbours and itself).
    dropped = next({a, b} for a in cohort for b in cohort if a < b and recoverable({a, b}))
    submit(w, vectors, weights, rng, drop_after_mask=dropped)

    result = unmask(w)

    survivors = [p for p in cohort if p not in dropped]
    want_sum, want_weight = expected_sums(vectors, weights, survivors, config.clip)
    assert result.contributors == survivors
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def test_too_many_dropouts_abort_before_any_share_is_requested() -> None:
    cohort = [0, 1, 2, 3]  # t = 3 of 4 holders: two survivors hold two shares of each seed
    w = open_window(cohort, 5)
    exchange_keys(w)
    rng = np.random.default_rng(3)
    vectors = {p: rng.normal(size=5) for p in cohort}
    submit(w, vectors, dict.fromkeys(cohort, 1.0), rng, drop_after_mask=[2, 3])
    before = w.aggregator.masked_total.copy()

    with pytest.raises(AbortedRound) as caught:
        w.aggregator.fix_survivors()

    assert caught.value.expected == 3 and caught.value.found == 2
    assert w.aggregator.stage is AggregatorStage.ABORTED
    np.testing.assert_array_equal(w.aggregator.masked_total, before)


def test_missing_unmasking_shares_abort_without_touching_the_accumulator() -> None:
    cohort = [0, 1, 2, 3, 4]  # t = 3 of 5 holders (4 neighbours and the party itself)
    w = open_window(cohort, 5)
    exchange_keys(w)
    rng = np.random.default_rng(4)
    vectors = {p: rng.normal(size=5) for p in cohort}
    submit(w, vectors, dict.fromkeys(cohort, 1.0), rng)
    before = w.aggregator.masked_total.copy()

    with pytest.raises(AbortedRound):
        unmask(w, withheld=[0, 1, 2])  # two survivors reveal: fewer than t = 3

    assert w.aggregator.stage is AggregatorStage.ABORTED
    np.testing.assert_array_equal(w.aggregator.masked_total, before)


def test_chunked_submission_equals_whole_vector_and_broken_stream_counts_as_dropped() -> None:
    cohort = [0, 1, 2, 3, 4]
    w = open_window(cohort, 10)
    exchange_keys(w)
    rng = np.random.default_rng(5)
    vectors = {p: rng.normal(size=10) for p in cohort}
    weights = dict.fromkeys(cohort, 2.0)
    masked = {p: w.participants[p].mask(vectors[p], weights[p], rng) for p in cohort}
    for p in (0, 1, 2):
        w.aggregator.add_masked(p, masked[p])
    for offset in range(0, 11, 4):
        w.aggregator.add_masked_chunk(3, offset, masked[3][offset : offset + 4])
    w.aggregator.add_masked_chunk(4, 0, masked[4][:6])  # stream breaks after 6 of 11
    assert w.aggregator.open_streams == 1

    result = unmask(w)

    want_sum, want_weight = expected_sums(vectors, weights, [0, 1, 2, 3], w.config.clip)
    assert result.contributors == [0, 1, 2, 3]
    assert w.aggregator.open_streams == 0
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def test_out_of_order_chunk_is_rejected_and_changes_nothing() -> None:
    w = open_window([0, 1, 2], 8)
    exchange_keys(w)
    masked = w.participants[0].mask(np.zeros(8), 1.0, np.random.default_rng(6))
    w.aggregator.add_masked_chunk(0, 0, masked[:3])
    before = w.aggregator.masked_total.copy()

    with pytest.raises(LengthMismatch) as caught:
        w.aggregator.add_masked_chunk(0, 5, masked[5:])

    assert (caught.value.expected, caught.value.found) == (3, 5)
    np.testing.assert_array_equal(w.aggregator.masked_total, before)


@settings(max_examples=10, deadline=None)
@given(
    size=st.integers(9, 14),
    dropped=st.sets(st.integers(0, 13), max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_secagg_plus_rounds_complete_exactly_when_every_secret_keeps_t_holders(
    size: int, dropped: set[int], seed: int
) -> None:
    cohort = list(range(size))
    gone = dropped & set(cohort)
    w = open_window(cohort, 5, config=SecAggConfig(neighbours=4), window=seed % 1000)
    exchange_keys(w)
    rng = np.random.default_rng(seed)
    vectors = {p: rng.uniform(-1, 1, size=5) for p in cohort}
    weights = {p: 1.0 for p in cohort}
    submit(w, vectors, weights, rng, drop_after_mask=gone)
    graph = w.aggregator.graph
    alive = set(cohort) - gone
    # A survivor's seed needs t of its surviving holders (neighbours and itself); a dropped
    # party's key needs t of its surviving neighbours (its own share left with it).
    recoverable = all(
        len(graph.holders(p) & alive) >= graph.threshold(p)
        for p in cohort
        if p in alive or graph.of(p) & alive
    )

    if not recoverable:
        with pytest.raises(AbortedRound):
            w.aggregator.fix_survivors()
        return
    result = unmask(w)

    want_sum, want_weight = expected_sums(vectors, weights, sorted(alive), w.config.clip)
    assert result.contributors == sorted(alive)
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound


def test_round_works_when_every_message_crosses_as_bytes() -> None:
    cohort = [3, 5, 8, 13]
    w = open_window(cohort, 7)
    agg, parties = w.aggregator, w.participants
    for p, participant in parties.items():
        agg.add_advertisement(p, KeyAdvertisement.from_bytes(participant.advertise().to_bytes()))
    ads = {
        p: KeyAdvertisement.from_bytes(ad.to_bytes())
        for p, ad in agg.close_advertisements().items()
    }
    for p, participant in parties.items():
        bundle = participant.share_keys(ads)
        agg.add_shares(p, {r: EncryptedShare.from_bytes(s.to_bytes()) for r, s in bundle.items()})
    for p, shares in agg.route_shares().items():
        parties[p].receive_shares([EncryptedShare.from_bytes(s.to_bytes()) for s in shares])
    rng = np.random.default_rng(9)
    vectors = {p: rng.normal(size=7) for p in cohort}
    for p in cohort[:3]:
        wire = parties[p].mask(vectors[p], 0.5, rng).astype("<u4").tobytes()
        agg.add_masked(p, np.frombuffer(wire, dtype="<u4"))
    survivors = agg.fix_survivors()
    for p in survivors:
        agg.add_survivor_signature(p, parties[p].sign_survivors(survivors))
    signatures = agg.survivor_signatures()
    for p in survivors:
        wire = parties[p].unmask(survivors, signatures).to_bytes()
        agg.add_unmasking_shares(p, UnmaskingShares.from_bytes(wire))

    result = agg.finalize()

    want_sum, want_weight = expected_sums(vectors, dict.fromkeys(cohort, 0.5), survivors, 1.0)
    assert survivors == [3, 5, 8]
    assert np.max(np.abs(result.weighted_sum - want_sum)) < result.quantization_bound
    assert abs(result.weight_sum - want_weight) < result.quantization_bound
