"""Mask generator: a ChaCha20 keystream read as uint32 words, added into vectors mod 2^32.

The keystream is produced chunk by chunk into one reused buffer (256 KiB, it
stays in cache) with ``update_into``, and each chunk is added to or subtracted
from the target slice by numpy, so applying a mask costs one keystream pass and
one in-place vector add, with no per-element Python work.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

#: 32-bit little-endian block counter (starts at 0) followed by a 96-bit nonce of zeros.
#: Each mask key is used for exactly one keystream: keys are derived per window and pair.
_NONCE = bytes(16)
KEY_BYTES = 32
CHUNK_WORDS = 1 << 16


class MaskGenerator:
    """Applies ``±PRG(key)`` to uint32 vectors, reusing its keystream buffers across calls."""

    def __init__(self, chunk_words: int = CHUNK_WORDS) -> None:
        if chunk_words < 16 or chunk_words % 16:
            raise ValueError(f"chunk_words: got {chunk_words}, want a positive multiple of 16")
        self._zeros = np.zeros(chunk_words, dtype=np.uint32)
        self._words = np.empty(chunk_words, dtype="<u4")  # words are little-endian everywhere
        self._zero_bytes = self._zeros.view(np.uint8).data
        self._word_bytes = self._words.view(np.uint8).data

    def apply(self, target: NDArray[np.uint32], key: bytes, *, sign: int) -> None:
        """Add (``sign=+1``) or subtract (``sign=-1``) the keystream of ``key`` into ``target``.

        Raises ``ValueError`` on a key that is not 32 bytes, a sign other than
        ±1, or a target that is not a contiguous 1-D uint32 array.
        """
        if len(key) != KEY_BYTES:
            raise ValueError(f"mask key: got {len(key)} bytes, want {KEY_BYTES}")
        if sign not in (1, -1):
            raise ValueError(f"sign: got {sign}, want +1 or -1")
        if target.dtype != np.uint32 or target.ndim != 1 or not target.flags.c_contiguous:
            raise ValueError("target: want a contiguous 1-D uint32 array")
        encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        combine = np.add if sign > 0 else np.subtract
        chunk = self._zeros.shape[0]
        total = target.shape[0]
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            encryptor.update_into(self._zero_bytes[: 4 * count], self._word_bytes[: 4 * count])
            segment = target[start : start + count]
            combine(segment, self._words[:count], out=segment)

    def expand(self, key: bytes, length: int) -> NDArray[np.uint32]:
        """Return ``PRG(key)`` as a fresh uint32 vector of ``length`` words (tests, tools)."""
        out = np.zeros(length, dtype=np.uint32)
        self.apply(out, key, sign=1)
        return out
