"""`echelon-audit-log`: runs the audit log service.

Settings: defaults < the TOML file (`--config`) < `ECHELON_*` environment < flags
(docs/configuration.md). Example file::

    [service]
    host = "0.0.0.0"           # the default: every party appends from outside
    port = 50052               # the default
    metrics_port = 9452        # the default
    data_dir = "/var/lib/echelon/audit-log"
    [audit_log]
    origin = "echelon.audit/prod"
    checkpoint_every = 64      # sign a tree head unasked after this many appends
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

import structlog

from echelon.audit.record import LOG_PARTY
from echelon.tomlconfig import ConfigFileError
from echelon.trust.manifest import PartyRole
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import wait_for_signal
from services.common.settings import AUDIT_LOG, Resolved, ServiceConfig, add_arguments, resolve
from services.common.transport import TransportError, load_transport

from .server import AuditLogConfig, create_server

log = structlog.get_logger(__name__)


def load_config(resolved: Resolved, common: ServiceConfig) -> AuditLogConfig:
    """The [audit_log] table with [service]'s data dir and listen address."""
    table = {**resolved.tables.get("audit_log", {}), "data_dir": str(common.data_dir)}
    return replace(resolved.build(AuditLogConfig, table, "audit_log"), server=common.server)


def main(argv: Sequence[str] | None = None) -> int:
    """Serves until SIGINT or SIGTERM, then drains in-flight calls and closes the store."""
    parser = argparse.ArgumentParser(
        prog=AUDIT_LOG.prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, AUDIT_LOG)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        resolved = resolve(AUDIT_LOG, args, os.environ)
        common = resolved.service()
        config = load_config(resolved, common)
    except ConfigFileError as exc:
        print(f"{AUDIT_LOG.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(resolved.render(common, audit_log=config), end="")
        return 0
    configure_logging("audit-log", common.log_level)
    try:
        transport = load_transport(common, LOG_PARTY, PartyRole.AUDIT_LOG)
    except TransportError as exc:
        print(f"{AUDIT_LOG.prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    metrics_port = start_metrics(common.metrics_host, common.metrics_port)
    running = create_server(config, transport)
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
