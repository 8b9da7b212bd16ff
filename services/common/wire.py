"""Chunked vector streams with a whole-payload digest, and fresh window references.

Vectors cross as one header (encoding, length, SHA-256 of all bytes) followed by
chunks of at most `CHUNK_BYTES`; the receiver checks offsets, size and digest and
refuses anything else, so no single message approaches gRPC's 4 MiB limit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from echelon_proto.common.v1 import common_pb2

from .validate import RequestError

CHUNK_BYTES = 1 << 20
MAX_VECTOR_ELEMENTS = 1 << 28  # 1 GiB of float32; a request bound, not a model limit

_DTYPES: dict[int, np.dtype[Any]] = {
    common_pb2.ENCODING_FLOAT32_LE: np.dtype("<f4"),
    common_pb2.ENCODING_UINT32_LE: np.dtype("<u4"),
    common_pb2.ENCODING_FLOAT64_LE: np.dtype("<f8"),
}


def new_ref(window: int) -> common_pb2.WindowRef:
    """A window reference with a fresh 16-byte nonce."""
    return common_pb2.WindowRef(window=window, nonce=os.urandom(16))


def vector_sha256(vector: np.ndarray) -> bytes:
    """SHA-256 of the vector's little-endian bytes (what the stream header carries)."""
    return hashlib.sha256(le_bytes(vector)).digest()


def vector_header(vector: np.ndarray, layout_digest: bytes = b"") -> common_pb2.VectorHeader:
    """Describes `vector` (float32, uint32 or float64) for streaming."""
    encoding = {
        np.dtype("float32"): common_pb2.ENCODING_FLOAT32_LE,
        np.dtype("uint32"): common_pb2.ENCODING_UINT32_LE,
        np.dtype("float64"): common_pb2.ENCODING_FLOAT64_LE,
    }.get(vector.dtype)
    if encoding is None:
        raise TypeError(f"vector dtype: got {vector.dtype}, want float32, uint32 or float64")
    data = le_bytes(vector)
    return common_pb2.VectorHeader(
        encoding=encoding,
        length=vector.size,
        total_bytes=len(data),
        sha256=hashlib.sha256(data).digest(),
        layout_digest=layout_digest,
    )


def le_bytes(vector: np.ndarray) -> memoryview:
    """The vector's little-endian bytes: what streams, what is hashed and audited."""
    little = np.ascontiguousarray(vector, dtype=vector.dtype.newbyteorder("<"))
    return little.data.cast("B")


def iter_chunks(vector: np.ndarray) -> Iterator[common_pb2.VectorChunk]:
    """Yields the vector's bytes as chunks of at most CHUNK_BYTES."""
    data = le_bytes(vector)
    for offset in range(0, len(data), CHUNK_BYTES):
        yield common_pb2.VectorChunk(offset=offset, data=bytes(data[offset : offset + CHUNK_BYTES]))


class VectorReceiver:
    """Reassembles a chunked vector and verifies it against its header.

    Raises RequestError (INVALID_ARGUMENT or DATA_LOSS) on a malformed header, an
    out-of-order or oversized chunk, or a digest mismatch.
    """

    def __init__(self, header: common_pb2.VectorHeader, what: str, want_length: int | None) -> None:
        dtype = _DTYPES.get(header.encoding)
        if dtype is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}.encoding: got {header.encoding}, want FLOAT32_LE, UINT32_LE or FLOAT64_LE",
            )
        if want_length is not None and header.length != want_length:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}.length: got {header.length}, want {want_length}",
            )
        size = dtype.itemsize
        if (
            not 0 < header.length <= MAX_VECTOR_ELEMENTS
            or header.total_bytes != size * header.length
        ):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}: got length {header.length} and {header.total_bytes} bytes, "
                f"want 0 < length <= {MAX_VECTOR_ELEMENTS} and total_bytes = {size} * length",
            )
        if len(header.sha256) != 32:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}.sha256: got {len(header.sha256)} bytes, want 32",
            )
        self._what = what
        self._header = header
        self._dtype = dtype
        self._buffer = bytearray(header.total_bytes)
        self._filled = 0
        self._hash = hashlib.sha256()

    def add(self, chunk: common_pb2.VectorChunk) -> None:
        if chunk.offset != self._filled:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self._what} chunk.offset: got {chunk.offset}, want {self._filled}",
            )
        size = len(chunk.data)
        if size == 0 or size > CHUNK_BYTES or self._filled + size > len(self._buffer):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self._what} chunk: got {size} bytes at {chunk.offset}, want 1..{CHUNK_BYTES} "
                f"within {len(self._buffer)} bytes",
            )
        self._buffer[self._filled : self._filled + size] = chunk.data
        self._hash.update(chunk.data)
        self._filled += size

    def finish(self) -> np.ndarray:
        """Returns the vector (native dtype); raises DATA_LOSS when incomplete or corrupt."""
        if self._filled != len(self._buffer):
            raise RequestError(
                grpc.StatusCode.DATA_LOSS,
                f"{self._what}: got {self._filled} bytes, want {len(self._buffer)}",
            )
        if self._hash.digest() != self._header.sha256:
            raise RequestError(
                grpc.StatusCode.DATA_LOSS,
                f"{self._what}: SHA-256 of received bytes {self._hash.hexdigest()[:16]}... "
                f"does not match the header's {self._header.sha256.hex()[:16]}...",
            )
        little = np.frombuffer(self._buffer, dtype=self._dtype)
        return little.astype(self._dtype.newbyteorder("="), copy=True)

    @property
    def filled(self) -> int:
        return self._filled

    @property
    def total(self) -> int:
        return len(self._buffer)

    @property
    def sha256(self) -> bytes:
        return bytes(self._header.sha256)
