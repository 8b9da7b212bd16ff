"""What the aggregator and the relay cannot do: read inputs, split views, replay, inject."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import (
    GRAPH_SEED,
    Window,
    exchange_keys,
    make_identities,
    open_window,
    submit,
    unmask,
)

from echelon.secagg import (
    ConfigError,
    ConsistencyError,
    DuplicateSubmission,
    InsufficientSignatures,
    InvalidSignature,
    KeyAdvertisement,
    LateSubmission,
    LengthMismatch,
    MalformedMessage,
    Participant,
    SecAggConfig,
    ShareAuthenticationError,
    ShareReconstructionError,
    StageError,
    UnexpectedShare,
    UnknownParty,
    UnmaskingShares,
    WrongWindow,
    decode,
    keys,
    session_context,
    shamir,
    survivor_list_bytes,
)


def _chi_square_critical(dof: int, z: float) -> float:
    # Wilson–Hilferty approximation of the chi-square quantile at standard-normal quantile z.
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _masked_window(cohort: list[int], dim: int, seed: int = 0):  # type: ignore[no-untyped-def]
    w = open_window(cohort, dim)
    exchange_keys(w)
    rng = np.random.default_rng(seed)
    vectors = {p: rng.normal(size=dim) for p in cohort}
    submit(w, vectors, dict.fromkeys(cohort, 1.0), rng)
    return w


def test_masked_vector_of_constant_input_is_uniform() -> None:
    dim = 1 << 15
    w = open_window([0, 1, 2], dim)
    exchange_keys(w)
    masked = w.participants[0].mask(np.zeros(dim), 1.0, np.random.default_rng(0))

    # Bucket by the top and by the bottom byte; p = 1e-9 per test (z = 6.0) never flakes.
    critical = _chi_square_critical(255, 6.0)
    for byte in (masked >> 24, masked & 0xFF):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        expected = masked.shape[0] / 256
        statistic = float(((counts - expected) ** 2 / expected).sum())
        assert statistic < critical


def test_single_masked_vector_decodes_to_noise() -> None:
    dim = 1 << 14
    w = open_window([0, 1, 2], dim)
    exchange_keys(w)
    signal = np.linspace(-1.0, 1.0, dim)
    masked = w.participants[1].mask(signal, 1.0, np.random.default_rng(0))

    decoded, _ = decode(masked, w.config)

    correlation = float(np.corrcoef(decoded, signal)[0, 1])
    assert abs(correlation) < 6 / math.sqrt(dim)  # six standard errors of a null correlation


def test_split_survivor_lists_never_release_both_shares_of_one_party() -> None:
    cohort = [0, 1, 2, 3, 4]  # t = 3 of 5 holders (4 neighbours and the party itself)
    w = _masked_window(cohort, 4)
    victim = 4
    claims_dropped, claims_alive = [0, 1, 2, 3], [0, 1, 2, 3, 4]
    # A lying aggregator shows {0, 1} a list without the victim, {2, 3, 4} one with it.
    view_a = {p: w.participants[p].sign_survivors(claims_dropped) for p in (0, 1)}
    view_b = {p: w.participants[p].sign_survivors(claims_alive) for p in (2, 3, 4)}
    released: list[UnmaskingShares] = []

    for party in (0, 1):
        with pytest.raises(InsufficientSignatures):
            w.participants[party].unmask(claims_dropped, view_a)
        with pytest.raises(ConsistencyError):
            w.participants[party].unmask(claims_alive, view_b)
    for party in (2, 3, 4):
        released.append(w.participants[party].unmask(claims_alive, view_b))
    with pytest.raises(StageError):
        w.participants[0].sign_survivors(claims_alive)

    key_shares = [o for r in released for o, _ in r.pairwise_key_shares if o == victim]
    assert key_shares == []
    seed_holders = [r.holder for r in released for o, _ in r.self_mask_shares if o == victim]
    assert seed_holders == [2, 3, 4]  # the victim's own share of its own seed among them


def _released_shares(
    released: list[UnmaskingShares], owner: int
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The seed shares and key shares of ``owner``, by holder, in what was released."""
    seed = {r.holder: v for r in released for o, v in r.self_mask_shares if o == owner}
    key = {r.holder: v for r in released for o, v in r.pairwise_key_shares if o == owner}
    return seed, key


def _lie(w: Window, views: dict[int, list[int]]) -> list[UnmaskingShares]:
    """A lying aggregator: each party sees its own survivor list and every signature over it."""
    signatures = {p: w.participants[p].sign_survivors(view) for p, view in views.items()}
    released = []
    for party, view in views.items():
        relayed = {q: signatures[q] for q, other in views.items() if other == view}
        with contextlib.suppress(InsufficientSignatures):
            released.append(w.participants[party].unmask(view, relayed))
    return released


@pytest.mark.parametrize("victim", [0, 1, 2])
@pytest.mark.parametrize("told_dropped", [0, 1, 2], ids=lambda k: f"{k}-told-dropped")
def test_aggregator_lying_about_one_of_three_parties_gets_at_most_one_secret(
    victim: int, told_dropped: int
) -> None:
    # All three masked vectors arrived; the aggregator claims the victim dropped to
    # ``told_dropped`` of the other two (hoping for its s key) and shows the rest, and the
    # victim, the true list (hoping for its seed). t = 2 of 3 holders, the victim included.
    w = _masked_window([0, 1, 2], 4, seed=victim)
    others = [p for p in (0, 1, 2) if p != victim]
    without = others
    with pytest.raises(ConsistencyError):
        w.participants[victim].sign_survivors(without)  # it never signs a list omitting it
    views = {p: without if p in others[:told_dropped] else [0, 1, 2] for p in (0, 1, 2)}

    seed, key = _released_shares(_lie(w, views), victim)

    t = w.aggregator.graph.threshold(victim)
    assert t == 2
    assert not (len(seed) >= t and len(key) >= t)
    if told_dropped == 2:
        # Both others accept "victim dropped" (2 signatures): its key is released, which
        # removes only its pairwise masks; the victim sees one signature on its own list,
        # so its seed (and with it its input) stays hidden.
        assert (sorted(seed), sorted(key)) == ([], others)
        rebuilt = X25519PrivateKey.from_private_bytes(shamir.reconstruct(key))
        assert keys.public_bytes(rebuilt) == w.ads[victim].s_pk
    else:
        # At most one other is told it dropped: it sees only its own signature and refuses;
        # the victim and the remaining parties release seed shares, its own share among them.
        assert sorted(key) == []
        assert sorted(seed) == sorted([victim, *others[told_dropped:]])
        commitment = keys.self_mask_commitment(shamir.reconstruct(seed), window=1, party=victim)
        assert commitment == w.ads[victim].self_mask_commitment


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_arbitrary_survivor_lists_never_release_t_seed_and_t_key_shares_of_one_party(
    data: st.DataObject,
) -> None:
    n = data.draw(st.integers(3, 6), label="n")
    cohort = list(range(n))
    w = _masked_window(cohort, 2, seed=n)
    # A few candidate lists, each the cohort less some parties "claimed dropped"; every party
    # is shown one that names it (it refuses any other), so groups of parties share a view.
    claims = data.draw(
        st.lists(st.sets(st.sampled_from(cohort), min_size=1, max_size=n - 2), max_size=3),
        label="claimed dropped",
    )
    candidates = [cohort, *(sorted(set(cohort) - claim) for claim in claims)]
    views = {
        p: data.draw(st.sampled_from([c for c in candidates if p in c]), label=f"list of {p}")
        for p in cohort
    }

    released = _lie(w, views)

    for owner in cohort:
        seed, key = _released_shares(released, owner)
        t = w.aggregator.graph.threshold(owner)
        assert owner not in key  # nobody releases a share of its own s key
        assert set(seed).isdisjoint(key)  # one kind of share per holder and owner
        assert not (len(seed) >= t and len(key) >= t)


def test_too_few_signatures_withhold_shares() -> None:
    w = _masked_window([0, 1, 2, 3, 4], 4)
    survivors = [0, 1, 2, 3, 4]
    signatures = {p: w.participants[p].sign_survivors(survivors) for p in (0, 1)}

    with pytest.raises(InsufficientSignatures) as caught:
        w.participants[0].unmask(survivors, signatures)

    assert (caught.value.expected, caught.value.found) == (3, 2)


def test_own_signature_is_required() -> None:
    w = _masked_window([0, 1, 2, 3, 4], 4)
    survivors = [0, 1, 2, 3, 4]
    signatures = {p: w.participants[p].sign_survivors(survivors) for p in survivors}
    del signatures[0]

    with pytest.raises(InsufficientSignatures):
        w.participants[0].unmask(survivors, signatures)


def test_forged_signature_is_refused_by_participant_and_aggregator() -> None:
    w = _masked_window([0, 1, 2, 3], 4)
    survivors = w.aggregator.fix_survivors()
    signatures = {p: w.participants[p].sign_survivors(survivors) for p in survivors}
    context = w.aggregator.graph.context
    forged = w.identities[2].sign(survivor_list_bytes(w.window, survivors, context))  # 2 as 1

    with pytest.raises(InvalidSignature):
        w.participants[0].unmask(survivors, {**signatures, 1: forged})
    with pytest.raises(InvalidSignature):
        w.aggregator.add_survivor_signature(1, forged)


def test_naming_a_survivor_dropped_is_refused() -> None:
    w = _masked_window([0, 1, 2, 3], 4)
    survivors = [0, 1, 2, 3]
    signatures = {p: w.participants[p].sign_survivors(survivors) for p in survivors}

    with pytest.raises(ConsistencyError) as caught:
        w.participants[0].unmask(survivors, signatures, dropped=[2])

    assert caught.value.found == [2]


def test_aggregator_refuses_key_share_of_a_survivor_and_keeps_state() -> None:
    cohort = [0, 1, 2, 3, 4]
    w = open_window(cohort, 4)
    exchange_keys(w)
    rng = np.random.default_rng(0)
    submit(
        w,
        {p: rng.normal(size=4) for p in cohort},
        dict.fromkeys(cohort, 1.0),
        rng,
        drop_after_mask=[4],
    )
    survivors = w.aggregator.fix_survivors()
    for p in survivors:
        w.aggregator.add_survivor_signature(p, w.participants[p].sign_survivors(survivors))
    honest = w.participants[0].unmask(survivors, w.aggregator.survivor_signatures())
    assert [o for o, _ in honest.pairwise_key_shares] == [4]
    assert [o for o, _ in honest.self_mask_shares] == [0, 1, 2, 3]  # its own seed share too
    # Move survivor 1's share into the key-share list: a request to reveal a survivor's key.
    seed_shares = dict(honest.self_mask_shares)
    smuggled = dataclasses.replace(
        honest,
        self_mask_shares=tuple((o, v) for o, v in honest.self_mask_shares if o != 1),
        pairwise_key_shares=((1, seed_shares[1]), *honest.pairwise_key_shares),
    )
    before = w.aggregator.masked_total.copy()

    with pytest.raises(UnexpectedShare) as caught:
        w.aggregator.add_unmasking_shares(0, smuggled)

    assert caught.value.found == 1
    np.testing.assert_array_equal(w.aggregator.masked_total, before)
    # Its own share of its own seed is due; moved to the key list it would reveal its s key.
    own_key = dataclasses.replace(
        honest,
        self_mask_shares=tuple((o, v) for o, v in honest.self_mask_shares if o != 0),
        pairwise_key_shares=((0, seed_shares[0]), *honest.pairwise_key_shares),
    )
    with pytest.raises(UnexpectedShare) as caught:
        w.aggregator.add_unmasking_shares(0, own_key)
    assert caught.value.found == 0
    w.aggregator.add_unmasking_shares(0, honest)  # the refused messages left no trace


def test_corrupted_unmasking_share_is_detected_before_any_mask_is_removed() -> None:
    w = _masked_window([0, 1, 2], 4)
    survivors = w.aggregator.fix_survivors()
    for p in survivors:
        w.aggregator.add_survivor_signature(p, w.participants[p].sign_survivors(survivors))
    signatures = w.aggregator.survivor_signatures()
    for p in survivors:
        shares = w.participants[p].unmask(survivors, signatures)
        if p == 0:
            owner, value = shares.self_mask_shares[0]
            bad = bytes([value[0] ^ 1]) + value[1:]
            shares = dataclasses.replace(shares, self_mask_shares=((owner, bad),))
        w.aggregator.add_unmasking_shares(p, shares)
    before = w.aggregator.masked_total.copy()

    with pytest.raises(ShareReconstructionError):
        w.aggregator.finalize()

    np.testing.assert_array_equal(w.aggregator.masked_total, before)


def test_bad_masked_submissions_are_typed_and_leave_the_accumulator_unchanged() -> None:
    w = open_window([0, 1, 2, 3], 6)
    exchange_keys(w)
    rng = np.random.default_rng(0)
    masked = {p: w.participants[p].mask(np.ones(6), 1.0, rng) for p in range(4)}
    for p in (0, 1, 2):
        w.aggregator.add_masked(p, masked[p])
    before = w.aggregator.masked_total.copy()

    with pytest.raises(LengthMismatch):
        w.aggregator.add_masked(3, masked[3][:-1])
    with pytest.raises(DuplicateSubmission):
        w.aggregator.add_masked(0, masked[0])
    with pytest.raises(UnknownParty):
        w.aggregator.add_masked(9, masked[3])
    np.testing.assert_array_equal(w.aggregator.masked_total, before)

    assert w.aggregator.fix_survivors() == [0, 1, 2]
    with pytest.raises(LateSubmission):
        w.aggregator.add_masked(3, masked[3])
    np.testing.assert_array_equal(w.aggregator.masked_total, before)


def test_tampered_share_fails_authentication() -> None:
    w = open_window([0, 1, 2], 4)
    for p, participant in w.participants.items():
        w.aggregator.add_advertisement(p, participant.advertise())
    ads = w.aggregator.close_advertisements()
    bundles = {p: participant.share_keys(ads) for p, participant in w.participants.items()}
    honest = bundles[1][0]
    flipped = bytes([honest.ciphertext[0] ^ 0x80]) + honest.ciphertext[1:]

    with pytest.raises(ShareAuthenticationError):
        w.participants[0].receive_shares([dataclasses.replace(honest, ciphertext=flipped)])

    w.participants[0].receive_shares([bundles[1][0], bundles[2][0]])  # state is intact


def test_relay_cannot_substitute_advertised_keys() -> None:
    w = open_window([0, 1, 2], 4)
    ads = {p: participant.advertise() for p, participant in w.participants.items()}
    swapped = dataclasses.replace(ads[1], c_pk=ads[2].c_pk)

    with pytest.raises(InvalidSignature):
        w.participants[0].share_keys({**ads, 1: swapped})
    with pytest.raises(InvalidSignature):
        w.aggregator.add_advertisement(1, swapped)


def test_messages_of_an_earlier_window_are_rejected() -> None:
    cohort = [0, 1, 2]
    old = open_window(cohort, 4, window=7)
    old_ads = {p: participant.advertise() for p, participant in old.participants.items()}
    old_shares = {p: participant.share_keys(old_ads) for p, participant in old.participants.items()}
    new = open_window(cohort, 4, window=8, identities=old.identities)
    for p, participant in new.participants.items():
        new.aggregator.add_advertisement(p, participant.advertise())
    new_ads = new.aggregator.close_advertisements()
    for participant in new.participants.values():
        participant.share_keys(new_ads)

    with pytest.raises(WrongWindow) as caught:
        new.participants[0].receive_shares([old_shares[1][0]])
    assert (caught.value.expected, caught.value.found) == (8, 7)
    relabelled = dataclasses.replace(old_shares[1][0], window=8)
    with pytest.raises(ShareAuthenticationError):
        new.participants[0].receive_shares([relabelled])
    fresh = open_window(cohort, 4, window=8, identities=old.identities)
    with pytest.raises(WrongWindow):
        fresh.aggregator.add_advertisement(1, old_ads[1])
    with pytest.raises(InvalidSignature):
        fresh.aggregator.add_advertisement(1, dataclasses.replace(old_ads[1], window=8))


def test_old_survivor_signature_does_not_verify_in_a_new_window() -> None:
    w = _masked_window([0, 1, 2], 4)
    survivors = w.aggregator.fix_survivors()
    earlier = session_context(GRAPH_SEED, w.window - 1, w.cohort)
    replayed = w.identities[1].sign(survivor_list_bytes(w.window - 1, survivors, earlier))

    with pytest.raises(InvalidSignature):
        w.aggregator.add_survivor_signature(1, replayed)


@pytest.mark.parametrize(
    ("seed", "cohort"),
    [(b"another-run/7", [0, 1, 2]), (GRAPH_SEED, [0, 1, 2, 3])],
    ids=["another run", "another cohort"],
)
def test_a_signature_from_another_run_or_cohort_does_not_verify(
    seed: bytes, cohort: list[int]
) -> None:
    # The same window number, parties and keys: only the run (the graph seed names it) or
    # the cohort differs, and the signatures made there are refused here.
    w = _masked_window([0, 1, 2], 4)
    survivors = w.aggregator.fix_survivors()
    elsewhere = session_context(seed, w.window, cohort)
    replayed = w.identities[1].sign(survivor_list_bytes(w.window, survivors, elsewhere))
    with pytest.raises(InvalidSignature):
        w.aggregator.add_survivor_signature(1, replayed)

    fresh = open_window([0, 1, 2], 4, window=w.window, identities=w.identities)
    honest = fresh.participants[1].advertise()
    fields = {
        "window": honest.window,
        "party": 1,
        "c_pk": honest.c_pk,
        "s_pk": honest.s_pk,
        "self_mask_commitment": honest.self_mask_commitment,
    }
    signed = KeyAdvertisement.signed_bytes_of(context=elsewhere, **fields)  # type: ignore[arg-type]
    moved = dataclasses.replace(honest, signature=w.identities[1].sign(signed))
    with pytest.raises(InvalidSignature, match="this run's window and cohort"):
        fresh.aggregator.add_advertisement(1, moved)


def test_methods_out_of_stage_raise_stage_error() -> None:
    w = open_window([0, 1, 2], 4)

    with pytest.raises(StageError):
        w.participants[0].mask(np.zeros(4), 1.0, np.random.default_rng(0))
    with pytest.raises(StageError):
        w.aggregator.finalize()
    with pytest.raises(StageError):
        w.aggregator.route_shares()


def test_full_round_after_harness_sanity() -> None:
    w = _masked_window([0, 1, 2], 3)
    result = unmask(w)
    assert result.contributors == [0, 1, 2]


def test_low_order_agreement_key_is_refused_even_when_properly_signed() -> None:
    w = open_window([0, 1, 2], 4)
    honest = w.participants[1].advertise()
    fields = {
        "window": honest.window,
        "party": 1,
        "c_pk": bytes(32),  # u = 0: every X25519 agreement with it is all-zero
        "s_pk": honest.s_pk,
        "self_mask_commitment": honest.self_mask_commitment,
    }
    signed = KeyAdvertisement.signed_bytes_of(context=w.aggregator.graph.context, **fields)  # type: ignore[arg-type]
    signature = w.identities[1].sign(signed)
    hostile = KeyAdvertisement(**fields, signature=signature)  # type: ignore[arg-type]

    with pytest.raises(MalformedMessage):
        w.aggregator.add_advertisement(1, hostile)


def test_participant_refuses_an_identity_other_than_the_registered_one() -> None:
    private, public = make_identities([0, 1, 2])

    with pytest.raises(ConfigError, match="registered identity"):
        Participant(
            party_id=0,
            window=1,
            cohort=[0, 1, 2],
            identity=private[1],
            peer_identities=public,
            config=SecAggConfig(),
            graph_seed=b"g",
        )
