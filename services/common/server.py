"""Builds and runs gRPC servers with health checking, reflection and graceful shutdown."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default; chunked streams stay far below it


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Where and how a service listens."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port, reported by `start_server`
    max_workers: int = 16
    grace_s: float = 5.0
    # A second, plaintext port that serves only gRPC health, for probes that cannot
    # present a client certificate (Kubernetes' `grpc:` probes); -1: none, 0: ephemeral.
    health_port: int = -1

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port: got {self.port}, want 0..65535")
        if not -1 <= self.health_port <= 65535:
            raise ValueError(f"ServerConfig.health_port: got {self.health_port}, want -1..65535")
        if self.max_workers < 2:
            raise ValueError(f"ServerConfig.max_workers: got {self.max_workers}, want >= 2")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class RunningServer:
    """A started server, its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    health_server: grpc.Server | None = None  # the plaintext health-only server, if any
    health_port: int | None = None

    def stop(self, grace_s: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()


def start_server(
    config: ServerConfig,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    interceptors: Iterable[grpc.ServerInterceptor] = (),  # type: ignore[type-arg]
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Starts a server with the given services plus health and reflection, on TLS with
    `credentials` (mTLS: `services.common.transport`) or plaintext without.

    Raises RuntimeError when the address cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # Agents keep their long-lived, often idle window sessions up with a ping every
            # 10 s (services/boundary_agent/session.py, KEEPALIVE): accept pings that often
            # without data, or the server answers them with GOAWAY (too_many_pings).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            # and ping back, so that a session whose agent vanished ends within ~30 s.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ],
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if credentials is None:
        port = server.add_insecure_port(config.address)
    else:
        port = server.add_secure_port(config.address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind {config.address}")
    server.start()
    log.info(
        "server_started",
        address=config.address,
        port=port,
        services=names,
        tls=credentials is not None,
    )
    running = RunningServer(server=server, port=port, health=health_servicer)
    if config.health_port >= 0:
        running.health_server, running.health_port = _start_health_server(config, health_servicer)
    return running


def _start_health_server(
    config: ServerConfig, servicer: health.HealthServicer
) -> tuple[grpc.Server, int]:
    """Serves `servicer` alone on config.health_port, without TLS: it tells only whether
    the service is serving. Raises RuntimeError when the port cannot be bound."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = server.add_insecure_port(f"{host}:{config.health_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {host}:{config.health_port} for health")
    server.start()
    log.info("health_server_started", host=config.host, port=port)
    return server, port


def wait_for_signal(running: RunningServer, on_stop: Callable[[], None], grace_s: float) -> None:
    """Blocks until SIGINT or SIGTERM, then stops the server gracefully and runs `on_stop`."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    stop.wait()
    running.stop(grace_s)
    on_stop()
    log.info("server_stopped", port=running.port)
