"""Request validation in one message form, and the replay guard for window nonces.

Messages read `"<Message>.<field>: got <found>, want <expected>"`, as STYLE.md asks;
servicers raise `RequestError` and one interceptor-free helper maps it to a status.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NoReturn

import grpc


class RequestError(Exception):
    """A request that cannot be served; carries the gRPC status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, got: object, want: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: got {got!r}, want {want}")


def require(condition: bool, field: str, got: object, want: str) -> None:
    """Raises INVALID_ARGUMENT when `condition` is false."""
    if not condition:
        raise invalid(field, got, want)


def abort(context: grpc.ServicerContext, error: RequestError) -> NoReturn:
    context.abort(error.code, error.message)
    raise AssertionError("unreachable: context.abort raises")


class NonceGuard:
    """Remembers recent (window, nonce) pairs and refuses a repeat (a replayed request)."""

    def __init__(self, capacity: int = 65536) -> None:
        self._seen: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def check(self, message: str, window: int, nonce: bytes) -> None:
        """Raises INVALID_ARGUMENT for a malformed nonce and ALREADY_EXISTS for a repeat."""
        if not 8 <= len(nonce) <= 64:
            raise invalid(f"{message}.ref.nonce", f"{len(nonce)} bytes", "8..64 random bytes")
        key = (window, bytes(nonce))
        with self._lock:
            if key in self._seen:
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{message}.ref: nonce already used in window {window} (replayed request)",
                )
            self._seen[key] = None
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
