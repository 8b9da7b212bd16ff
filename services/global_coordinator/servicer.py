"""gRPC servicer of the coordinator: registration, liveness, versions and status; domain errors
become status codes by the one table of `services.common.errors`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import grpc
import structlog

from echelon.audit.record import KeyRegistration, PayloadType, Role, RunConfig
from echelon_proto.common.v1 import common_pb2
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc, session_pb2
from services.common.audited import AuditedPeer, message_bytes
from services.common.errors import status_on_error
from services.common.validate import NonceGuard, registered_model
from services.common.wire import iter_chunks, vector_header

from .driver import WindowDriver
from .registry import Registry
from .store import Registration

log = structlog.get_logger(__name__)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        driver: WindowDriver,
        audit: AuditedPeer,
        run_config: Callable[[], bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.driver = driver
        self.audit = audit
        self.run_config = run_config
        self.clock = clock
        self.nonces = NonceGuard()

    def Session(
        self,
        request_iterator: Iterator[session_pb2.AgentFrame],
        context: grpc.ServicerContext,
    ) -> Iterator[session_pb2.CoordinatorFrame]:
        """This coordinator drives windows by calling the agents' BoundaryAgent service; the
        dial-out window session is served by `services.global_coordinator.session`."""
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Coordinator.Session: this coordinator calls its agents; run the session "
            "coordinator for dial-out agents",
        )

    def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        with status_on_error(context, "RegisterRequest"):
            self.nonces.check("RegisterRequest", request.ref.window, request.ref.nonce)
            reg = Registration(
                request.boundary, request.address, bytes(request.identity_key), int(request.devices)
            )
            model = registered_model(request)
            if len(reg.identity_key) == 32:
                self.audit.gate.received(
                    PayloadType.KEY_REGISTRATION,
                    request.boundary,
                    0,
                    message_bytes(request),
                    KeyRegistration(role=Role.BOUNDARY, signing_key=reg.identity_key),
                )
            self.registry.register(reg, model, self.clock())
            config = self.run_config()
            response = coordinator_pb2.RegisterResponse(
                ref=request.ref,
                run_id=self.driver.config.run_id,
                current_version=max(self.driver.version, 0),
                run_config=config,
                run_config_sha256=hashlib.sha256(config).digest(),
            )
            log.info("boundary_registered", boundary=reg.boundary, address=reg.address)
            return self.audit.reply(
                common_pb2.PAYLOAD_TYPE_RUN_CONFIG,
                reg.boundary,
                0,
                response,
                RunConfig(config=config),
            )
        raise AssertionError("unreachable: status_on_error aborts")

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        with status_on_error(context, "HeartbeatRequest"):
            self.nonces.check("HeartbeatRequest", request.ref.window, request.ref.nonce)
            self.registry.heartbeat(request.boundary, self.clock())
            self.audit.received(common_pb2.PAYLOAD_TYPE_STATUS, request.boundary, 0, request)
            response = coordinator_pb2.HeartbeatResponse(
                ref=request.ref,
                current_version=max(self.driver.version, 0),
                current_window=self.driver.window_id,
            )
            return self.audit.reply(common_pb2.PAYLOAD_TYPE_STATUS, request.boundary, 0, response)
        raise AssertionError("unreachable: status_on_error aborts")

    def FetchGlobal(
        self, request: coordinator_pb2.FetchGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.FetchGlobalResponse]:
        version = int(request.version) or self.driver.version
        try:
            phi = self.driver.store.load_adapter(version)
        except KeyError:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"FetchGlobalRequest.version: got {request.version}, want 0..{self.driver.version}",
            )
        identity = self.registry.identity
        digest = identity.layout_digest if identity else b""
        header = coordinator_pb2.GlobalVersionHeader(
            version=version, vector=vector_header(phi, digest)
        )
        yield coordinator_pb2.FetchGlobalResponse(header=header)
        for chunk in iter_chunks(phi):
            yield coordinator_pb2.FetchGlobalResponse(chunk=chunk)

    def GetStatus(
        self, request: coordinator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CoordinatorStatus:
        regs, seen = self.registry.snapshot()
        now = self.clock()
        live = sorted(b for b, t in seen.items() if now - t <= self.driver.config.window.liveness_s)
        return coordinator_pb2.CoordinatorStatus(
            run_id=self.driver.config.run_id,
            window=self.driver.window_id,
            version=max(self.driver.version, 0),
            inner_steps=self.driver.inner_steps,
            registered=sorted(regs),
            live=live,
            windows_completed=self.driver.completed,
            windows_aborted=self.driver.aborted,
        )

    def ListVersions(
        self, request: coordinator_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListVersionsResponse:
        return coordinator_pb2.ListVersionsResponse(
            versions=[
                coordinator_pb2.VersionInfo(
                    version=v.version,
                    window=v.window,
                    sha256=v.sha256,
                    contributors=list(v.contributors),
                    weight_sum=v.weight_sum,
                    created_unix_ms=v.created_ms,
                )
                for v in self.driver.store.versions()
            ]
        )
