"""The plaintext health-only port that the Kubernetes manifests probe (`grpc:` probes
present no client certificate): it answers gRPC health with the service's own status,
and serves nothing else."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.boundary_agent.status import ATTACHED, watch_attachment
from services.common.server import ServerConfig, start_server
from services.common.settings import COORDINATOR, ServiceConfig


def test_health_port_serves_the_services_health_and_nothing_else() -> None:
    running = start_server(ServerConfig(port=0, health_port=0), lambda _server: None, ["x.v1.X"])
    try:
        assert running.health_port is not None and running.health_port != running.port
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="")
            assert check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert check(request, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            other = channel.unary_unary(
                "/x.v1.X/Call",
                request_serializer=bytes,
                response_deserializer=bytes,
            )
            with pytest.raises(grpc.RpcError) as info:
                other(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.stop(0)


def test_no_health_port_by_default() -> None:
    running = start_server(ServerConfig(port=0), lambda _server: None, [])
    try:
        assert running.health_server is None and running.health_port is None
    finally:
        running.stop(0)


def test_health_port_is_a_service_setting() -> None:
    assert "health_port" in COORDINATOR.service_keys

    def config(health_port: int) -> ServiceConfig:
        return ServiceConfig(
            host="0.0.0.0",
            port=50051,
            metrics_host="0.0.0.0",
            metrics_port=9451,
            data_dir=Path("d"),
            health_port=health_port,
        )

    assert config(8081).server.health_port == 8081
    with pytest.raises(ValueError, match="health_port"):
        config(50051)


def test_attached_is_serving_only_while_the_agent_is_connected() -> None:
    running = start_server(ServerConfig(port=0, health_port=0), lambda _server: None, [])
    connected = threading.Event()
    stop = threading.Event()
    thread = watch_attachment(connected.is_set, running.health, stop, period_s=0.02)
    request = health_pb2.HealthCheckRequest(service=ATTACHED)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check

            def status_soon(want: int) -> int:
                for _ in range(250):
                    got: int = check(request, timeout=5).status
                    if got == want:
                        break
                    time.sleep(0.02)
                return got

            serving, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert status_soon(not_serving) == not_serving
            connected.set()
            assert status_soon(serving) == serving
            connected.clear()
            assert status_soon(not_serving) == not_serving
    finally:
        stop.set()
        thread.join(timeout=5)
        running.stop(0)
    assert not thread.is_alive()
