"""`echelon-audit-log` as a process: its TOML file, environment and flags, metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc

from services.audit_log.client import AuditClient

ROOT = Path(__file__).resolve().parents[2]


def _started(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "audit_log_serving":
                return event
    raise AssertionError("the service exited before serving")


def test_main_serves_from_toml_and_flags_then_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text(
        '[service]\nhost = "127.0.0.1"\nport = 1\nmetrics_host = "127.0.0.1"\n'
        'data_dir = "data"\nlog_level = "info"\n[audit_log]\norigin = "echelon.test/main"\n'
    )
    # The file < the environment < flags: the flag's ephemeral port wins over the file's.
    env = {**os.environ, "ECHELON_METRICS_PORT": "0", "ECHELON_PORT": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.audit_log", "--config", str(config), "--port", "0",
         "--insecure"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        event = _started(process)
        with grpc.insecure_channel(f"127.0.0.1:{event['port']}") as channel:
            head = AuditClient(channel, timeout_s=5).tree_head()
        assert head.size == 0 and head.checkpoint.startswith(b"echelon.test/main\n0\n")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{event['metrics_port']}/metrics")
        assert b"echelon_audit_tree_entries 0.0" in metrics.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert (tmp_path / "data" / "log.db").is_file()
        assert (tmp_path / "data" / "log.key").stat().st_mode & 0o077 == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
