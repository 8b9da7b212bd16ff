"""The agent's local status endpoint (for its own operators; loopback by default)."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc

from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc

from .session import AgentSession


class AgentStatusServicer(boundary_pb2_grpc.BoundaryAgentServicer):
    def __init__(
        self,
        boundary: str,
        session: AgentSession,
        workers_alive: Callable[[], int],
        own_stats: Callable[[], tuple[int, float]] = lambda: (0, math.nan),
    ) -> None:
        self.boundary = boundary
        self.session = session
        self.workers_alive = workers_alive
        self.own_stats = own_stats

    def GetStatus(
        self, request: boundary_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.BoundaryStatus:
        s = self.session.status()
        tokens, val_loss = self.own_stats()
        return boundary_pb2.BoundaryStatus(
            boundary=self.boundary,
            held_version=s.held_version,
            window=s.window,
            workers_alive=self.workers_alive(),
            has_pending_delta=s.pending > 0,
            pending_base_version=max(s.pending_base, 0),
            tokens_total=tokens,
            val_loss=val_loss,
            connected=s.connected,
            deltas_lost=s.lost,
            deltas_dropped=s.dropped,
        )
