"""RFC 6962 / RFC 9162 Merkle tree hashing, proof generation and proof verification.

`MerkleTree` keeps every complete, aligned subtree hash (2n - 1 hashes for n
leaves) so append is amortized O(1), and a root, an inclusion proof or a
consistency proof at any size costs O(log n) lookups with no rehashing. The
verifiers follow transparency-dev/merkle `proof/verify.go` and raise typed
errors that carry what was expected and what was found.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from .errors import LogRangeError, ProofError, RootMismatchError

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only Merkle tree over leaf hashes, with a cache of complete subtrees."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> int:
        """Adds a leaf hash; returns its index."""
        if len(leaf) != HASH_BYTES:
            raise ValueError(f"leaf hash: got {len(leaf)} bytes, want {HASH_BYTES}")
        index = len(self._levels[0])
        self._levels[0].append(leaf)
        level, i = 0, index
        while i & 1:
            if len(self._levels) == level + 1:
                self._levels.append([])
            row = self._levels[level]
            self._levels[level + 1].append(node_hash(row[i - 1], row[i]))
            level, i = level + 1, i >> 1
        return index

    def truncate(self, size: int) -> None:
        """Drops leaves from `size` on (undoes appends whose storage failed)."""
        for level, row in enumerate(self._levels):
            del row[size >> level :]

    def _range(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges RFC 6962's recursion produces."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        k = _split(n)
        return node_hash(self._range(start, start + k), self._range(start + k, end))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise LogRangeError(f"tree size: got {size}, want 0..{self.size}")

    def root(self, size: int | None = None) -> bytes:
        """The root of the tree of the first `size` leaves (default: all)."""
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._range(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path of leaf `index` in the tree of size `size` (RFC 6962 PATH)."""
        self._check_size(size)
        if not 0 <= index < size:
            raise LogRangeError(f"leaf index: got {index}, want 0..{size - 1}")
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self._range(start + k, end))
                end = start + k
            else:
                proof.append(self._range(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The proof that tree `first` is a prefix of tree `second` (RFC 6962 PROOF)."""
        self._check_size(second)
        if not 0 <= first <= second:
            raise LogRangeError(f"first tree size: got {first}, want 0..{second}")
        if first in (0, second):
            return []
        proof: list[bytes] = []
        start, end, m, whole = 0, second, first, True
        while True:
            n = end - start
            if m == n:
                if not whole:
                    proof.append(self._range(start, end))
                break
            k = _split(n)
            if m <= k:
                proof.append(self._range(start + k, end))
                end = start + k
            else:
                proof.append(self._range(start, start + k))
                start, m, whole = start + k, m - k, False
        proof.reverse()
        return proof


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The RFC 6962 root of a list of leaf hashes, by direct recursion (for checks)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = _split(len(leaf_hashes))
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


# --- verification (RFC 9162 section 2.1.3.2 and 2.1.4.2) --------------------------------


def _decomp(index: int, size: int) -> tuple[int, int]:
    """Inner and border lengths of the inclusion proof of `index` in a tree of `size`."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _check_hashes(what: str, hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_BYTES:
            raise ProofError(f"{what} hash {i} size", expected=HASH_BYTES, found=len(h))


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof. Raises ProofError when it is malformed."""
    if not 0 <= index < size:
        raise ProofError("inclusion index", expected=f"0..{size - 1}", found=index)
    _check_hashes("inclusion leaf", [leaf])
    _check_hashes("inclusion proof", proof)
    inner, border = _decomp(index, size)
    if len(proof) != inner + border:
        raise ProofError("inclusion proof length", expected=inner + border, found=len(proof))
    return _chain_border_right(_chain_inner(leaf, proof[:inner], index), proof[inner:])


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raises ProofError or RootMismatchError unless `proof` puts `leaf` at `index` under `root`."""
    found = root_from_inclusion_proof(index, size, leaf, proof)
    if found != root:
        raise RootMismatchError("inclusion root", expected=root.hex(), found=found.hex())


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raises ProofError or RootMismatchError unless tree `first` is a prefix of tree `second`."""
    _check_hashes("consistency root", [first_root, second_root])
    _check_hashes("consistency proof", proof)
    if not 0 <= first <= second:
        raise ProofError(
            "consistency sizes", expected="0 <= first <= second", found=(first, second)
        )
    if first == second:
        if proof:
            raise ProofError("consistency proof length", expected=0, found=len(proof))
        if first_root != second_root:
            raise RootMismatchError(
                "consistency roots of equal size",
                expected=first_root.hex(),
                found=second_root.hex(),
            )
        return
    if first == 0:
        if proof:
            raise ProofError("consistency proof length", expected=0, found=len(proof))
        if first_root != EMPTY_ROOT:
            raise RootMismatchError(
                "empty tree root", expected=EMPTY_ROOT.hex(), found=first_root.hex()
            )
        return
    inner, border = _decomp(first - 1, second)
    shift = (first & -first).bit_length() - 1
    inner -= shift
    seed, start = (first_root, 0) if first == 1 << shift else (proof[0] if proof else b"", 1)
    if len(proof) != start + inner + border:
        raise ProofError(
            "consistency proof length", expected=start + inner + border, found=len(proof)
        )
    rest = proof[start:]
    mask = (first - 1) >> shift
    found1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], mask), rest[inner:])
    if found1 != first_root:
        raise RootMismatchError(
            "consistency first root", expected=first_root.hex(), found=found1.hex()
        )
    found2 = _chain_border_right(_chain_inner(seed, rest[:inner], mask), rest[inner:])
    if found2 != second_root:
        raise RootMismatchError(
            "consistency second root", expected=second_root.hex(), found=found2.hex()
        )
