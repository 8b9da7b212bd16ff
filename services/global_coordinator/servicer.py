"""gRPC servicer of the coordinator: the agents' window sessions (dial-out streams), and
versions and status for operators and tools. Thin: the sessions executor and the store do
the work."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import structlog

from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc, session_pb2
from services.common.wire import iter_chunks, vector_header

from .session import CoordinatorSessions
from .store import CoordinatorStore

log = structlog.get_logger(__name__)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, *, sessions: CoordinatorSessions, store: CoordinatorStore) -> None:
        self.sessions = sessions
        self.store = store

    def Session(
        self, request_iterator: Iterator[session_pb2.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[session_pb2.CoordinatorFrame]:
        return self.sessions.session(request_iterator, context)

    def _latest(self) -> int:
        latest = self.store.latest_version()
        return -1 if latest is None else latest.version

    def FetchGlobal(
        self, request: coordinator_pb2.FetchGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.FetchGlobalResponse]:
        latest = self._latest()
        version = int(request.version) or latest
        try:
            phi = self.store.load_adapter(version)
        except KeyError:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"FetchGlobalRequest.version: got {request.version}, want 0..{max(latest, 0)}",
            )
        model = self.sessions.model
        digest = model.layout_digest if model else b""
        header = coordinator_pb2.GlobalVersionHeader(
            version=version, vector=vector_header(phi, digest)
        )
        yield coordinator_pb2.FetchGlobalResponse(header=header)
        for chunk in iter_chunks(phi):
            yield coordinator_pb2.FetchGlobalResponse(chunk=chunk)

    def GetStatus(
        self, request: coordinator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CoordinatorStatus:
        status = self.sessions.status()
        return coordinator_pb2.CoordinatorStatus(
            run_id=self.sessions.run_id,
            window=status.window,
            version=max(self._latest(), 0),
            inner_steps=status.inner_steps,
            registered=list(status.known),
            live=list(status.sessions),
            windows_completed=status.committed,
            windows_aborted=status.aborted,
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
                for v in self.store.versions()
            ]
        )
