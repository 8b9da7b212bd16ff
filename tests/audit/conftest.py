"""Fixtures of the audit tests: a real audit log server on an ephemeral port and its client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from echelon.audit import AppendResult
from services.audit_log.client import AuditClient
from services.audit_log.server import AuditLogConfig, AuditLogServer, create_server


class LogService:
    """Starts and restarts an audit log server over one data dir, with a client for it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: AuditLogServer | None = None
        self.channel: grpc.Channel | None = None
        self.client: AuditClient | None = None

    def start(self, data_dir: Path | None = None) -> AuditClient:
        self.stop()
        self.data_dir = data_dir or self.data_dir
        self.server = create_server(
            AuditLogConfig(data_dir=self.data_dir, origin="echelon.test/audit")
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.client = AuditClient(self.channel, timeout_s=10.0)
        return self.client

    # The service is itself a sink and a proof source that follows restarts, so gates and
    # witnesses built before a restart keep working, as they would over a reconnecting channel.
    def append(self, record: bytes, signature: bytes) -> AppendResult:
        assert self.client is not None, "service not started"
        return self.client.append(record, signature)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        assert self.client is not None, "service not started"
        return self.client.consistency_proof(first, second)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.stop(0.5)
        self.server = self.channel = self.client = None


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LogService]:
    svc = LogService(tmp_path / "audit")
    svc.start()
    yield svc
    svc.stop()
