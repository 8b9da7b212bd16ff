"""Structured JSON logs and the Prometheus endpoint; configured from `main()` only."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import start_http_server


def configure_logging(service: str, level: str = "info", json: bool = True) -> None:
    """Routes structlog to stderr as one JSON object per line, tagged with the service."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level: got {level!r}, want one of debug, info, warning, error")
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def start_metrics(host: str, port: int) -> int:
    """Serves Prometheus metrics over HTTP; port 0 picks a free port. Returns the port."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
