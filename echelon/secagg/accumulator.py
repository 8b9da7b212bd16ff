"""The aggregator's O(d) state: one uint32 accumulator that masked vectors are added into.

A vector that arrives whole (or in one chunk) is added in place at once. A
vector streamed in several chunks is staged in one d-vector until its last
chunk arrives, so a stream that breaks off never leaves a partial vector in
the sum; memory is the accumulator plus one vector per stream in progress.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from echelon.secagg.errors import DuplicateSubmission, LengthMismatch


class MaskedSum:
    """Sum mod 2^32 of the complete masked vectors received so far, and who sent them."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.total = np.empty(length, dtype=np.uint32)
        self.total.fill(0)  # touch every page now, not during the first submission
        self._received: dict[int, int] = {}
        self._streams: dict[int, NDArray[np.uint32]] = {}
        self.complete: set[int] = set()

    @property
    def open_streams(self) -> int:
        """Chunked submissions in progress, each holding one staging vector."""
        return len(self._streams)

    def add_chunk(self, party: int, offset: int, chunk: NDArray[np.uint32]) -> None:
        """Add coordinates ``[offset, offset + len(chunk))`` of ``party``'s vector, in order.

        Raises ``DuplicateSubmission`` when the party's vector is complete and
        ``LengthMismatch`` for a wrong dtype, offset or length; a rejected
        chunk changes nothing.
        """
        if party in self.complete:
            raise DuplicateSubmission(f"second masked vector of party {party}", expected=1, found=2)
        if chunk.ndim != 1 or chunk.dtype.kind != "u" or chunk.dtype.itemsize != 4:
            raise LengthMismatch(
                f"chunk of party {party}: got dtype {chunk.dtype} shape {chunk.shape}, "
                "want 1-D uint32",
                expected="1-D uint32",
                found=(str(chunk.dtype), chunk.shape),
            )
        received = self._received.get(party, 0)
        if offset != received:
            raise LengthMismatch(
                f"chunk of party {party}: offset {offset}, want {received} "
                "(chunks arrive in order)",
                expected=received,
                found=offset,
            )
        room = self.length - offset
        if not 1 <= chunk.shape[0] <= room:
            raise LengthMismatch(
                f"chunk of party {party}: {chunk.shape[0]} coordinates at offset {offset}, "
                f"want 1..{room} (masked vectors have d + 1 = {self.length})",
                expected=(1, room),
                found=chunk.shape[0],
            )
        end = offset + chunk.shape[0]
        if offset == 0 and end == self.length:
            np.add(self.total, chunk, out=self.total)
        else:
            staged = self._streams.get(party)
            if staged is None:
                staged = self._streams[party] = np.empty(self.length, dtype=np.uint32)
            staged[offset:end] = chunk
            if end == self.length:
                np.add(self.total, staged, out=self.total)
                del self._streams[party]
        self._received[party] = end
        if end == self.length:
            self.complete.add(party)

    def add_whole(self, party: int, vector: NDArray[np.uint32]) -> None:
        """Add a whole vector; refuses one of the wrong length or during the party's stream."""
        if vector.ndim != 1 or vector.shape[0] != self.length:
            raise LengthMismatch(
                f"masked vector of party {party}: shape {vector.shape}, want ({self.length},)",
                expected=self.length,
                found=vector.shape,
            )
        if party in self._streams:
            raise DuplicateSubmission(
                f"party {party} has a chunked submission in progress", expected=0, found=1
            )
        self.add_chunk(party, 0, vector)

    def close(self) -> tuple[int, ...]:
        """Discard unfinished streams; returns the parties whose whole vector is in the sum."""
        self._streams.clear()
        return tuple(sorted(self.complete))
