"""The probe behind the image's HEALTHCHECK (deploy/docker/healthcheck.py): it asks the
standard gRPC health service on a service's plaintext health-only port, which every
service, the audit log included, keeps serving for as long as it runs."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from grpc_health.v1 import health_pb2

from services.audit_log.server import AuditLogConfig, create_server
from services.common.server import ServerConfig, start_server

PROBE = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


def _probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echelon_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_exits_0_while_serving_and_1_otherwise(capsys: pytest.CaptureFixture[str]) -> None:
    running = start_server(ServerConfig(port=0, health_port=0), lambda _s: None, ["x.v1.X"])
    address = f"127.0.0.1:{running.health_port}"
    try:
        assert _probe().main([address]) == 0
        assert _probe().main([address, "--service", "x.v1.X"]) == 0
        assert "SERVING" in capsys.readouterr().out
        running.health.set("x.v1.X", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _probe().main([address, "--service", "x.v1.X"]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
        assert _probe().main([address, "--service", "y.v1.Unknown"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        running.stop(0)
    assert _probe().main([address, "--timeout", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_probe_defaults_to_the_health_port_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = start_server(ServerConfig(port=0, health_port=0), lambda _s: None, [])
    try:
        monkeypatch.setenv("ECHELON_HEALTH_PORT", str(running.health_port))
        assert _probe().main([]) == 0
    finally:
        running.stop(0)


def test_audit_log_keeps_its_health_port_serving(tmp_path: Path) -> None:
    config = AuditLogConfig(data_dir=tmp_path, server=ServerConfig(port=0, health_port=0))
    server = create_server(config)
    try:
        assert server.health_port is not None
        gc.collect()  # a health-only server that nothing holds would stop here
        assert _probe().main([f"127.0.0.1:{server.health_port}", "--timeout", "5"]) == 0
    finally:
        server.stop(0)
