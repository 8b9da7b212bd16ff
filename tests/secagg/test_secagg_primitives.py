"""Building blocks: codec, config checks, Shamir, the ChaCha20 mask PRG, KDF, graph, layouts."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.secagg import (
    ConfigError,
    EncryptedShare,
    InvalidContribution,
    KeyAdvertisement,
    MalformedMessage,
    MaskGenerator,
    NeighbourGraph,
    SecAggConfig,
    ShareReconstructionError,
    UnmaskingShares,
    decode,
    encode,
    keys,
    session_context,
    shamir,
    survivor_list_bytes,
)


def test_config_rejects_a_scale_that_can_overflow_the_cohort_sum() -> None:
    # 1024 * (16 * 2**17 + 1) >= 2**31: one fraction bit too many.
    with pytest.raises(ConfigError) as caught:
        SecAggConfig(frac_bits=17, max_weight=16.0, max_participants=1024)

    assert "lower frac_bits" in str(caught.value)
    assert caught.value.found == 1024 * (16 * 2**17 + 1)


def test_config_rejects_a_minority_threshold() -> None:
    with pytest.raises(ConfigError, match="threshold_fraction"):
        SecAggConfig(threshold_fraction=0.4)


def test_stochastic_rounding_is_unbiased_and_within_one_unit() -> None:
    config = SecAggConfig(frac_bits=4)
    value = np.full(200_000, 0.3)  # 0.3 * 16 = 4.8 units

    encoded = encode(value, 1.0, config, np.random.default_rng(0))
    decoded, weight = decode(encoded, config)

    assert set(np.unique(decoded)) == {4 / 16, 5 / 16}
    assert abs(decoded.mean() - 0.3) < 0.002  # 0.8 of draws round up: std err 5.6e-5 units
    assert weight == 1.0


def test_codec_clips_weights_and_wraps_negatives() -> None:
    config = SecAggConfig(clip=1.0, frac_bits=8)
    encoded = encode(np.array([-5.0, -0.5, 0.25, 7.0]), 2.0, config, np.random.default_rng(0))

    assert encoded[1] == 2**32 - 256  # -0.5 * 2 * 2**8 in two's complement
    decoded, weight = decode(encoded, config)
    np.testing.assert_array_equal(decoded, [-2.0, -1.0, 0.5, 2.0])
    assert weight == 2.0


@pytest.mark.parametrize(
    ("vector", "weight"),
    [(np.array([np.nan]), 1.0), (np.zeros((2, 2)), 1.0), (np.zeros(3), 17.0), (np.zeros(3), -1.0)],
)
def test_codec_refuses_bad_contributions(vector: np.ndarray, weight: float) -> None:
    with pytest.raises(InvalidContribution):
        encode(vector, weight, SecAggConfig(), np.random.default_rng(0))


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.sets(st.integers(0, 1000), min_size=1, max_size=9),
    data=st.data(),
)
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not(
    secret: bytes, holders: set[int], data: st.DataObject
) -> None:
    ordered = sorted(holders)
    threshold = data.draw(st.integers(1, len(ordered)))
    shares = shamir.split(secret, threshold=threshold, holders=ordered)
    chosen = data.draw(st.permutations(ordered))[:threshold]

    assert shamir.reconstruct({h: shares[h] for h in chosen}) == secret
    if threshold > 1:
        fewer = {h: shares[h] for h in chosen[:-1]}
        # Fewer shares interpolate to another value, which may not even fit 32 bytes.
        with contextlib.suppress(ShareReconstructionError):
            assert shamir.reconstruct(fewer) != secret


def test_chacha20_keystream_matches_rfc8439_test_vector() -> None:
    # RFC 8439 A.1 test vector #1: all-zero key and nonce, block counter 0; keystream bytes
    # 76 b8 e0 ad a0 f1 3d 90 ... read as little-endian uint32 words.
    words = MaskGenerator().expand(bytes(32), 4)
    np.testing.assert_array_equal(words, [0xADE0B876, 0x903DF1A0, 0xE56A5D40, 0x28BD8653])


def test_mask_is_chunk_size_independent_and_cancels() -> None:
    key = hashlib.sha256(b"k").digest()
    big, small = MaskGenerator(), MaskGenerator(chunk_words=16)
    length = 1000  # not a multiple of either chunk
    mask = big.expand(key, length)
    np.testing.assert_array_equal(mask, small.expand(key, length))

    target = np.arange(length, dtype=np.uint32)
    big.apply(target, key, sign=1)
    big.apply(target, key, sign=-1)
    np.testing.assert_array_equal(target, np.arange(length, dtype=np.uint32))


def _rfc5869_hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()  # salt None = 32 zero bytes
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_derived_keys_bind_purpose_window_and_parties() -> None:
    secret = b"\x07" * 32
    info = b"echelon/secagg/v1/pairwise-mask\x00" + struct.pack(">QII", 9, 2, 5)

    derived = keys.derive_key(secret, purpose=keys.PAIRWISE_MASK, window=9, first=2, second=5)

    assert derived == _rfc5869_hkdf_sha256(secret, info)
    others = {
        keys.derive_key(secret, purpose=keys.PAIRWISE_MASK, window=10, first=2, second=5),
        keys.derive_key(secret, purpose=keys.PAIRWISE_MASK, window=9, first=2, second=6),
        keys.derive_key(secret, purpose=keys.SELF_MASK, window=9, first=2, second=5),
    }
    assert derived not in others and len(others) == 3


def test_graph_is_symmetric_regular_and_public() -> None:
    config = SecAggConfig(neighbours=6)
    cohort = list(range(40))
    graph = NeighbourGraph.build(cohort=cohort, window=3, graph_seed=b"g", config=config)
    again = NeighbourGraph.build(cohort=cohort[::-1], window=3, graph_seed=b"g", config=config)
    later = NeighbourGraph.build(cohort=cohort, window=4, graph_seed=b"g", config=config)

    assert graph.neighbours == again.neighbours
    assert graph.neighbours != later.neighbours
    for party in cohort:
        assert len(graph.of(party)) == 6 and party not in graph.of(party)
        assert all(party in graph.of(peer) for peer in graph.of(party))
        assert graph.holders(party) == graph.of(party) | {party}
        assert graph.threshold(party) == 4  # of 7 holders: 6 neighbours and the party itself


@pytest.mark.parametrize("fraction", [0.5, 0.6, 2 / 3, 0.75, 0.99])
@pytest.mark.parametrize("size", [2, 3, 4, 5, 6, 7, 33])
def test_threshold_is_a_strict_majority_of_neighbours_and_self(fraction: float, size: int) -> None:
    config = SecAggConfig(threshold_fraction=fraction)
    graph = NeighbourGraph.build(cohort=range(size), window=0, graph_seed=b"g", config=config)

    for party in range(size):
        holders = len(graph.of(party)) + 1
        t = graph.threshold(party)
        assert t == math.floor(fraction * holders) + 1
        assert holders < 2 * t <= 2 * holders  # two disjoint sets of holders cannot both reach t


def test_default_graph_is_complete_for_small_cohorts_and_logarithmic_for_large() -> None:
    config = SecAggConfig()
    small = NeighbourGraph.build(cohort=range(32), window=0, graph_seed=b"g", config=config)
    large = NeighbourGraph.build(cohort=range(64), window=0, graph_seed=b"g", config=config)

    assert len(small.of(0)) == 31
    assert len(large.of(0)) == 24  # 2 * ceil(2 * log2(64))


def test_message_layouts_round_trip() -> None:
    ad = KeyAdvertisement(
        window=5,
        party=3,
        c_pk=b"c" * 32,
        s_pk=b"s" * 32,
        self_mask_commitment=b"m" * 32,
        signature=b"g" * 64,
    )
    share = EncryptedShare(window=5, sender=3, recipient=4, nonce=b"n" * 12, ciphertext=b"x" * 164)
    unmasking = UnmaskingShares(
        window=5,
        holder=3,
        self_mask_shares=((1, b"a" * 66),),
        pairwise_key_shares=((7, b"b" * 66),),
    )

    assert len(ad.to_bytes()) == 178 and KeyAdvertisement.from_bytes(ad.to_bytes()) == ad
    assert len(share.to_bytes()) == 198 and EncryptedShare.from_bytes(share.to_bytes()) == share
    assert UnmaskingShares.from_bytes(unmasking.to_bytes()) == unmasking
    assert ad.to_bytes()[:18] == b"ESAG\x02\x01" + (5).to_bytes(8, "big") + (3).to_bytes(4, "big")
    # The signature covers the window's context, which the layout does not carry.
    context = bytes(range(32))
    assert ad.signed_bytes(context) == ad.to_bytes()[:6] + context + ad.to_bytes()[6:114]


def test_survivor_list_canonical_bytes() -> None:
    # header "ESAG", version 2, type 4 | context 32 | window u64 | count u32 | ids u32 ascending
    context = bytes(range(32))
    expected = (
        bytes.fromhex("455341470204")
        + context
        + bytes.fromhex("0000000000000009" + "00000002" + "00000001" + "00000004")
    )
    assert survivor_list_bytes(9, [4, 1], context) == expected


def test_the_session_context_binds_run_window_and_cohort() -> None:
    base = session_context(b"run-a/3", 3, [2, 0, 1])
    assert base == session_context(b"run-a/3", 3, [0, 1, 2])  # the cohort as a set
    others = {
        session_context(b"run-b/3", 3, [0, 1, 2]),
        session_context(b"run-a/3", 4, [0, 1, 2]),
        session_context(b"run-a/3", 3, [0, 1, 2, 3]),
        session_context(b"run-a/3", 3, [0, 1]),
    }
    assert len(others) == 4 and base not in others and len(base) == 32


@pytest.mark.parametrize(
    "data",
    [b"", b"ESAG\x01\x02" + bytes(172), b"XXXX\x01\x01" + bytes(172), b"ESAG\x01\x01" + bytes(10)],
)
def test_malformed_advertisement_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        KeyAdvertisement.from_bytes(data)


def test_unmasking_shares_reject_unsorted_or_truncated_input() -> None:
    with pytest.raises(MalformedMessage):
        UnmaskingShares(
            window=1,
            holder=0,
            self_mask_shares=((5, bytes(66)), (2, bytes(66))),
            pairwise_key_shares=(),
        )
    good = UnmaskingShares(
        window=1, holder=0, self_mask_shares=((2, bytes(66)),), pairwise_key_shares=()
    )
    with pytest.raises(MalformedMessage):
        UnmaskingShares.from_bytes(good.to_bytes()[:-1])


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from([KeyAdvertisement, EncryptedShare, UnmaskingShares]),
    tail=st.one_of(
        st.binary(max_size=300),
        st.binary(min_size=172, max_size=172),  # a KeyAdvertisement's size
        st.binary(min_size=192, max_size=192),  # an EncryptedShare's size
        st.binary(min_size=20, max_size=20).map(lambda b: b[:12] + bytes(8)),  # no shares
    ),
    type_byte=st.integers(1, 4),
)
def test_arbitrary_bytes_parse_or_raise_malformed_message(
    kind: type[KeyAdvertisement] | type[EncryptedShare] | type[UnmaskingShares],
    tail: bytes,
    type_byte: int,
) -> None:
    data = b"ESAG\x01" + bytes([type_byte]) + tail
    try:
        parsed = kind.from_bytes(data)
    except MalformedMessage:
        return
    assert parsed.to_bytes() == data
