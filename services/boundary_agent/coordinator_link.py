"""The agent's calls to the coordinator: registration (audited) and liveness heartbeats."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from echelon.audit.record import KeyRegistration, PayloadType, Role, RunConfig
from echelon.declaration import DeclarationError, RunDeclaration
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.common.audited import AuditedPeer, message_bytes
from services.common.validate import registered_model
from services.common.wire import new_ref

log = structlog.get_logger(__name__)
COORDINATOR = "coordinator"


class RegistrationRefused(Exception):
    """The coordinator refused the registration for a reason a retry cannot fix."""


@dataclass(frozen=True)
class RunInfo:
    current_version: int
    declaration: RunDeclaration


class CoordinatorLink:
    def __init__(self, address: str, audit: AuditedPeer, timeout_s: float = 10.0) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._audit = audit
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def register(self, request: coordinator_pb2.RegisterRequest, retry_s: float) -> RunInfo:
        """Registers, retrying while the coordinator is unreachable for up to `retry_s`.

        Raises RegistrationRefused on INVALID_ARGUMENT, FAILED_PRECONDITION or
        PERMISSION_DENIED, and TimeoutError when it stays unreachable.
        """
        give_up = time.monotonic() + retry_s
        while True:
            request.ref.CopyFrom(new_ref(0))
            self._audit.gate.send(
                PayloadType.KEY_REGISTRATION,
                COORDINATOR,
                0,
                message_bytes(request),
                KeyRegistration(role=Role.BOUNDARY, signing_key=bytes(request.identity_key)),
                lambda: None,
            )
            try:
                response = self._stub.Register(request, timeout=self._timeout_s)
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    raise RegistrationRefused(f"{code.name}: {exc.details()}") from exc
                if time.monotonic() > give_up:
                    raise TimeoutError(
                        f"coordinator {self.address} unreachable: {code.name}"
                    ) from exc
                time.sleep(1.0)
        self._audit.gate.received(
            PayloadType.RUN_CONFIG,
            COORDINATOR,
            0,
            message_bytes(response),
            RunConfig(config=bytes(response.run_config)),
        )
        return RunInfo(int(response.current_version), _declaration(request, response))

    def heartbeats(
        self, boundary: str, held_version: Any, every_s: float, stop: threading.Event
    ) -> threading.Thread:
        """Starts a thread that reports liveness every `every_s` until `stop` is set."""

        def beat() -> None:
            while not stop.wait(every_s):
                request = coordinator_pb2.HeartbeatRequest(
                    ref=new_ref(0), boundary=boundary, held_version=max(held_version(), 0)
                )
                try:
                    self._audit.sent(PayloadType.STATUS, COORDINATOR, 0, request)
                    response = self._stub.Heartbeat(request, timeout=self._timeout_s)
                    self._audit.received(PayloadType.STATUS, COORDINATOR, 0, response)
                except grpc.RpcError as exc:
                    log.warning("heartbeat_failed", code=exc.code().name)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        return thread


def _declaration(
    request: coordinator_pb2.RegisterRequest, response: coordinator_pb2.RegisterResponse
) -> RunDeclaration:
    """The run's declaration, parsed and checked against what this boundary registered."""
    try:
        declaration = RunDeclaration.from_canonical_bytes(bytes(response.run_config))
    except DeclarationError as exc:
        raise RegistrationRefused(f"the run's declaration is invalid: {exc}") from exc
    if declaration.run_id != response.run_id:
        raise RegistrationRefused(
            f"RegisterResponse.run_id: got {response.run_id!r}, "
            f"want the declared {declaration.run_id!r}"
        )
    own = registered_model(request)
    if declaration.model != own:
        raise RegistrationRefused(
            f"declaration.model: got {declaration.model}, want this boundary's model {own}"
        )
    return declaration
