"""The agent's local status endpoint (for its own operators; loopback by default)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc

from .session import AgentSession

# The health service name that is SERVING only while the agent's session with the
# coordinator is up: what a readiness probe asks (deploy/k8s/); "" stays SERVING while the
# process lives, for liveness.
ATTACHED = "echelon.boundary.v1.Attached"


def watch_attachment(
    connected: Callable[[], bool],
    servicer: health.HealthServicer,
    stop: threading.Event,
    period_s: float = 1.0,
) -> threading.Thread:
    """Sets ATTACHED to SERVING or NOT_SERVING from `connected()` every `period_s` until
    `stop` is set, in a daemon thread that it returns."""

    def run() -> None:
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        while True:
            servicer.set(ATTACHED, serving if connected() else not_serving)
            if stop.wait(period_s):
                return

    thread = threading.Thread(target=run, name="attached", daemon=True)
    thread.start()
    return thread


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
