"""Registered boundaries, their liveness, and the run's declared model identity.

The first registration pins the adapter layout, base model and tokenizer digests
(unless the configuration pinned them); every later registration must match, so
all boundaries adapt the same model and their vectors have the same length.
"""

from __future__ import annotations

import re
import threading

import grpc

from echelon.declaration import ModelIdentity
from services.common.validate import RequestError

from .store import CoordinatorStore, Registration

_BOUNDARY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$")


class Registry:
    """Thread-safe registry; durable through the store."""

    def __init__(self, store: CoordinatorStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._registrations = store.registrations()
        self._last_seen: dict[str, float] = {}
        self._identity: ModelIdentity | None = None
        raw = store.get_meta("model_identity")
        if raw is not None:
            parts = raw.split(":")
            self._identity = ModelIdentity(
                bytes.fromhex(parts[0]),
                bytes.fromhex(parts[1]),
                bytes.fromhex(parts[2]),
                int(parts[3]),
            )

    @property
    def identity(self) -> ModelIdentity | None:
        with self._lock:
            return self._identity

    def register(self, reg: Registration, model: ModelIdentity, now_s: float) -> bool:
        """Validates and stores a registration. Returns True when it pinned the model identity.

        Raises RequestError (INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED).
        """
        _validate(reg)
        with self._lock:
            pinned = False
            if self._identity is None:
                self._identity = model
                self._store.set_meta(
                    "model_identity",
                    f"{model.layout_digest.hex()}:{model.base_model_digest.hex()}:"
                    f"{model.tokenizer_digest.hex()}:{model.dim}",
                )
                pinned = True
            _check_identity(self._identity, model)
            known = self._registrations.get(reg.boundary)
            if known is not None and known.identity_key != reg.identity_key:
                raise RequestError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"RegisterRequest.identity_key: boundary {reg.boundary!r} is registered with "
                    f"key {known.identity_key.hex()[:16]}..., got {reg.identity_key.hex()[:16]}...",
                )
            self._store.register(reg, int(now_s * 1000))
            self._registrations[reg.boundary] = reg
            self._last_seen[reg.boundary] = now_s
            return pinned

    def heartbeat(self, boundary: str, now_s: float) -> None:
        with self._lock:
            if boundary not in self._registrations:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"HeartbeatRequest.boundary: {boundary!r} is not registered; call Register",
                )
            self._last_seen[boundary] = now_s

    def mark_unreachable(self, boundary: str) -> None:
        """Forgets a boundary's liveness until it sends a heartbeat again."""
        with self._lock:
            self._last_seen.pop(boundary, None)

    def snapshot(self) -> tuple[dict[str, Registration], dict[str, float]]:
        with self._lock:
            return dict(self._registrations), dict(self._last_seen)


def _validate(reg: Registration) -> None:
    if not _BOUNDARY_ID.match(reg.boundary):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"RegisterRequest.boundary: got {reg.boundary!r}, want [a-z0-9][a-z0-9-]{{0,62}}",
        )
    if not _ADDRESS.match(reg.address):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"RegisterRequest.address: got {reg.address!r}, want host:port",
        )
    if len(reg.identity_key) != 32:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"RegisterRequest.identity_key: got {len(reg.identity_key)} bytes, want 32 (Ed25519)",
        )
    if reg.devices < 1:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"RegisterRequest.devices: got {reg.devices}, want >= 1",
        )


def _check_identity(pinned: ModelIdentity, got: ModelIdentity) -> None:
    for name in ("layout_digest", "base_model_digest", "tokenizer_digest", "dim"):
        want, have = getattr(pinned, name), getattr(got, name)
        if want != have:
            show = (lambda v: v.hex()[:16] + "...") if isinstance(want, bytes) else repr
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"RegisterRequest.{name}: got {show(have)}, want {show(want)} (the run's model)",
            )
