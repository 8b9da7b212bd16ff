"""gRPC servicer of the coordinator: the agents' window sessions (dial-out streams), and
versions and status for operators and tools. Thin: the sessions executor and the store do
the work."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import structlog

from echelon.audit.errors import AuditError
from echelon.audit.record import PARTY_RE, PayloadType
from echelon.trust.manifest import PartyRole
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc, session_pb2
from services.common.audited import AuditedPeer
from services.common.transport import Transport
from services.common.wire import iter_chunks, le_bytes, vector_header

from .session import CoordinatorSessions
from .store import CoordinatorStore

log = structlog.get_logger(__name__)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """With mTLS (`transport` with a kit) every call is authorized by its peer's
    certificate: a window session is a boundary's, acting as itself; versions, status and
    downloads are for manifest parties, and a download of the global adapter is recorded
    on the audit log like any crossing."""

    def __init__(
        self,
        *,
        sessions: CoordinatorSessions,
        store: CoordinatorStore,
        transport: Transport | None = None,
        audit: AuditedPeer | None = None,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.transport = transport or Transport(kit=None)
        self.audit = audit

    def Session(
        self, request_iterator: Iterator[session_pb2.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[session_pb2.CoordinatorFrame]:
        party = self.transport.authorize(context, (PartyRole.BOUNDARY,))
        peer = None if party is None else party.party_id
        return self.sessions.session(request_iterator, context, peer)

    def _latest(self) -> int:
        latest = self.store.latest_version()
        return -1 if latest is None else latest.version

    def FetchGlobal(
        self, request: coordinator_pb2.FetchGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.FetchGlobalResponse]:
        party = self.transport.authorize(context)
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
        if self.audit is not None:
            receiver = "" if party is None else party.party_id
            self._record_download(context, receiver or context.peer(), version, phi)
        yield coordinator_pb2.FetchGlobalResponse(header=header)
        for chunk in iter_chunks(phi):
            yield coordinator_pb2.FetchGlobalResponse(chunk=chunk)

    def _record_download(
        self, context: grpc.ServicerContext, receiver: str, version: int, phi: np.ndarray
    ) -> None:
        """The download crosses like any global version: recorded first, refused unsent."""
        assert self.audit is not None
        name = receiver if PARTY_RE.fullmatch(receiver) else "unauthenticated"
        try:
            self.audit.gate.send(
                PayloadType.GLOBAL_ADAPTER,
                name,
                0,  # a download belongs to no window
                le_bytes(phi.astype(np.float32)),
                None,
                lambda: None,
            )
        except AuditError as exc:
            log.error("download_refused", receiver=name, version=version, error=str(exc))
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"FetchGlobal: the download could not be recorded on the audit log: {exc}",
            )
        log.info("global_downloaded", receiver=name, version=version)

    def GetStatus(
        self, request: coordinator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CoordinatorStatus:
        self.transport.authorize(context)
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
        self.transport.authorize(context)
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
