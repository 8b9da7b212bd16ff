"""RFC 6962 hashing known answers, proofs for all small sizes, and a corpus of hostile proofs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from echelon.audit import LogRangeError, ProofError, RootMismatchError, VerificationError
from echelon.audit.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# The RFC 6962 reference leaves used by certificate-transparency and transparency-dev/merkle.
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f")
]  # fmt: skip

# Roots of the first n RFC_LEAVES. Reproduce one with, e.g. for n = 2:
#   python3 -c "import hashlib as h; l=lambda d: h.sha256(b'\0'+d).digest(); \
#     print(h.sha256(b'\1'+l(b'')+l(b'\0')).hexdigest())"
# or all of them with `python3 -c "from echelon.audit.merkle import *; ..."` as in this test.
RFC_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    # printf '' | sha256sum
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert MerkleTree().root() == EMPTY_ROOT


def test_leaf_hash_prefixes_0x00() -> None:
    # printf '\x00' | sha256sum
    assert (
        leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    # printf '\x00abc' | sha256sum
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()


def test_node_hash_prefixes_0x01() -> None:
    # python3 -c "import hashlib; print(hashlib.sha256(b'\1' + bytes(32) + b'\xff'*32).hexdigest())"
    assert (
        node_hash(bytes(32), b"\xff" * 32)
        == hashlib.sha256(b"\x01" + bytes(32) + b"\xff" * 32).digest()
    )


@pytest.mark.parametrize("size", sorted(RFC_ROOTS))
def test_roots_of_the_rfc_reference_tree(size: int) -> None:
    tree = MerkleTree(leaf_hash(x) for x in RFC_LEAVES)
    assert tree.root(size).hex() == RFC_ROOTS[size]
    assert root_of([leaf_hash(x) for x in RFC_LEAVES[:size]]).hex() == RFC_ROOTS[size]


LEAVES = [leaf_hash(i.to_bytes(2, "big")) for i in range(33)]
BIG = MerkleTree(LEAVES)


@pytest.mark.parametrize("size", range(1, 34))
def test_incremental_root_matches_direct_recursion(size: int) -> None:
    assert MerkleTree(LEAVES[:size]).root() == root_of(LEAVES[:size]) == BIG.root(size)


def test_inclusion_proofs_verify_for_all_indexes_of_sizes_1_to_33() -> None:
    for size in range(1, 34):
        root = BIG.root(size)
        for index in range(size):
            verify_inclusion(index, size, LEAVES[index], BIG.inclusion_proof(index, size), root)


def test_consistency_proofs_verify_for_all_pairs_of_sizes_up_to_33() -> None:
    for first in range(34):
        for second in range(first, 34):
            proof = BIG.consistency_proof(first, second)
            verify_consistency(first, second, BIG.root(first), BIG.root(second), proof)


def test_proof_requests_outside_the_tree_are_range_errors() -> None:
    with pytest.raises(LogRangeError):
        BIG.inclusion_proof(5, 5)
    with pytest.raises(LogRangeError):
        BIG.inclusion_proof(0, 34)
    with pytest.raises(LogRangeError):
        BIG.consistency_proof(6, 5)


def test_truncate_undoes_appends() -> None:
    tree = MerkleTree(LEAVES[:20])
    tree.truncate(13)
    assert tree.size == 13 and tree.root() == root_of(LEAVES[:13])
    tree.append(LEAVES[13])
    assert tree.root() == root_of(LEAVES[:14])


# --- hostile proofs --------------------------------------------------------------------

Proof = list[bytes]
Mutation = Callable[[Proof], Proof]
PROOF_MUTATIONS: dict[str, Mutation] = {
    "truncated": lambda p: p[:-1],
    "extended": lambda p: [*p, p[-1]],
    "extended with zeros": lambda p: [*p, bytes(32)],
    "prepended": lambda p: [bytes(32), *p],
    "trailing garbage on a hash": lambda p: [*p[:-1], p[-1] + b"\x00"],
    "short hash": lambda p: [*p[:-1], p[-1][:31]],
    "first two swapped": lambda p: [p[1], p[0], *p[2:]] if len(p) > 1 else p,
    "last two swapped": lambda p: [*p[:-2], p[-1], p[-2]] if len(p) > 1 else p,
    "bit flipped": lambda p: [bytes([p[0][0] ^ 1]) + p[0][1:], *p[1:]],
    "reversed": lambda p: p[::-1],
    "empty": lambda p: [],
}

INCLUSION_CASES = [(2, 8), (5, 7), (0, 13), (12, 13), (6, 22), (31, 33)]


@pytest.mark.parametrize("mutation", sorted(PROOF_MUTATIONS))
@pytest.mark.parametrize(("index", "size"), INCLUSION_CASES)
def test_hostile_inclusion_proofs_are_rejected(mutation: str, index: int, size: int) -> None:
    valid = BIG.inclusion_proof(index, size)
    proof = PROOF_MUTATIONS[mutation](valid)
    if proof == valid:
        pytest.skip("the mutation leaves a one-hash proof unchanged")
    with pytest.raises(VerificationError):
        verify_inclusion(index, size, LEAVES[index], proof, BIG.root(size))


@pytest.mark.parametrize(("index", "size"), INCLUSION_CASES)
def test_inclusion_with_wrong_index_leaf_or_root_is_rejected(index: int, size: int) -> None:
    proof = BIG.inclusion_proof(index, size)
    root = BIG.root(size)
    for wrong in (index ^ 1, index + 1):
        if wrong != index:
            with pytest.raises(VerificationError):
                verify_inclusion(wrong, size, LEAVES[index], proof, root)
    with pytest.raises(RootMismatchError):
        verify_inclusion(index, size, LEAVES[index + 1], proof, root)
    with pytest.raises(RootMismatchError):
        verify_inclusion(index, size, LEAVES[index], proof, BIG.root(size - 1))
    with pytest.raises(ProofError):
        verify_inclusion(size, size, LEAVES[index], proof, root)


@pytest.mark.parametrize(("index", "size"), INCLUSION_CASES)
def test_inclusion_with_a_wrong_tree_size_is_rejected(index: int, size: int) -> None:
    proof = BIG.inclusion_proof(index, size)
    for wrong in (size * 2, index, 0):
        with pytest.raises(VerificationError):
            verify_inclusion(index, wrong, LEAVES[index], proof, BIG.root(size))


CONSISTENCY_CASES = [(1, 8), (3, 8), (4, 8), (6, 8), (5, 13), (7, 22), (16, 33), (31, 33)]


@pytest.mark.parametrize("mutation", sorted(PROOF_MUTATIONS))
@pytest.mark.parametrize(("first", "second"), CONSISTENCY_CASES)
def test_hostile_consistency_proofs_are_rejected(mutation: str, first: int, second: int) -> None:
    valid = BIG.consistency_proof(first, second)
    proof = PROOF_MUTATIONS[mutation](valid)
    if proof == valid:
        pytest.skip("the mutation leaves a one-hash proof unchanged")
    with pytest.raises(VerificationError):
        verify_consistency(first, second, BIG.root(first), BIG.root(second), proof)


@pytest.mark.parametrize(("first", "second"), CONSISTENCY_CASES)
def test_consistency_with_wrong_sizes_or_roots_is_rejected(first: int, second: int) -> None:
    proof = BIG.consistency_proof(first, second)
    r1, r2 = BIG.root(first), BIG.root(second)
    with pytest.raises(VerificationError):  # roots swapped
        verify_consistency(first, second, r2, r1, proof)
    with pytest.raises(VerificationError):  # sizes swapped
        verify_consistency(second, first, r1, r2, proof)
    with pytest.raises(VerificationError):  # first size off by one
        verify_consistency(first + 1, second, r1, r2, proof)
    with pytest.raises(VerificationError):  # second size doubled
        # (a size whose proof has the same shape, e.g. 13 -> 14, computes the same roots:
        # only the signed checkpoint binds a root to its size)
        verify_consistency(first, second * 2, r1, r2, proof)
    with pytest.raises(RootMismatchError):  # a forked second tree
        verify_consistency(first, second, r1, BIG.root(second - 1), proof)


def test_equal_sizes_need_equal_roots_and_no_proof() -> None:
    verify_consistency(5, 5, BIG.root(5), BIG.root(5), [])
    with pytest.raises(RootMismatchError):
        verify_consistency(5, 5, BIG.root(5), BIG.root(6), [])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, BIG.root(5), BIG.root(5), [BIG.root(5)])
    with pytest.raises(ProofError):
        verify_consistency(0, 5, EMPTY_ROOT, BIG.root(5), [BIG.root(5)])


def test_errors_carry_expected_and_found() -> None:
    proof = BIG.inclusion_proof(2, 8)
    with pytest.raises(ProofError) as info:
        verify_inclusion(2, 8, LEAVES[2], proof[:-1], BIG.root(8))
    assert (info.value.expected, info.value.found) == (3, 2)
