"""`echelon-audit-log`: runs the audit log service from a TOML file and flags.

Flags override the file. Example file::

    [server]
    listen = "0.0.0.0:7300"
    [audit_log]
    data_dir = "/var/lib/echelon/audit"
    origin = "echelon.audit/prod"
    checkpoint_every = 64      # sign a tree head unasked after this many appends
    [metrics]
    port = 9300
    [logging]
    level = "info"
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from echelon.audit.log import DEFAULT_CHECKPOINT_EVERY
from echelon.tomlconfig import ConfigFileError, load_toml
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import ServerConfig, wait_for_signal

from .server import AuditLogConfig, create_server

log = structlog.get_logger(__name__)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen: got {text!r}, want HOST:PORT (port 0 picks a free one)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="echelon-audit-log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--listen", help="HOST:PORT to serve gRPC on (default 127.0.0.1:7300)")
    parser.add_argument("--data-dir", type=Path, help="directory of log.db and the log key")
    parser.add_argument("--origin", help="checkpoint origin line")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (-1: off, 0: any)")
    parser.add_argument("--metrics-host", help="Prometheus bind address (default 127.0.0.1)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--port-file", type=Path, help="write the bound ports here as JSON")
    return parser.parse_args(list(argv) if argv is not None else None)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    file: dict[str, Any] = {}
    if args.config is not None:
        try:
            file = load_toml(args.config)
        except ConfigFileError as exc:
            raise SystemExit(f"--config: {exc}") from None
    server, audit, metrics, logging = (
        dict(file.get(n, {})) for n in ("server", "audit_log", "metrics", "logging")
    )
    data_dir = args.data_dir or audit.get("data_dir")
    if data_dir is None:
        raise SystemExit(
            "--data-dir: missing, want a directory (or audit_log.data_dir in --config)"
        )
    return {
        "listen": args.listen or server.get("listen", "127.0.0.1:7300"),
        "data_dir": Path(data_dir),
        "origin": args.origin or audit.get("origin", "echelon.audit/log"),
        "checkpoint_every": int(audit.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)),
        "metrics_port": args.metrics_port
        if args.metrics_port is not None
        else int(metrics.get("port", 9300)),
        "metrics_host": args.metrics_host or metrics.get("host", "127.0.0.1"),
        "log_level": args.log_level or logging.get("level", "info"),
        "grace_s": float(server.get("grace_s", 5.0)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Serves until SIGINT or SIGTERM, then drains in-flight calls and closes the store."""
    args = _arguments(argv)
    settings = _settings(args)
    configure_logging("audit-log", settings["log_level"])
    host, port = _parse_listen(settings["listen"])
    config = AuditLogConfig(
        data_dir=settings["data_dir"],
        origin=settings["origin"],
        checkpoint_every=settings["checkpoint_every"],
        server=ServerConfig(host=host, port=port, grace_s=settings["grace_s"]),
    )
    metrics_port = start_metrics(settings["metrics_host"], settings["metrics_port"])
    running = create_server(config)
    log.info(
        "audit_log_serving",
        port=running.port,
        metrics_port=metrics_port,
        data_dir=str(config.data_dir),
    )
    write_port_file(args.port_file, grpc=running.port, metrics=metrics_port)
    wait_for_signal(running, lambda: None, config.server.grace_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
