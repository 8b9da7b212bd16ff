"""Runs the global coordinator: `python -m services.global_coordinator --config FILE.toml`.

TOML tables: [server], [service] (data_dir, audit, metrics_port, log_level),
[coordinator] (run_id, windows, rpc_timeout_s, token_unit), [inner], [window],
[outer], [secagg], [staleness]. Flags override the listen address and service keys.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import structlog

from echelon.audit.record import Role
from echelon.tomlconfig import ConfigFileError, build
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from services.common.bootstrap import (
    audited_peer,
    common_arguments,
    common_config,
    load_tables,
    watch_audit_log,
)
from services.common.identity import load_or_create_identity
from services.common.obs import configure_logging, start_metrics
from services.common.portfile import write_port_file
from services.common.server import start_server, wait_for_signal

from .config import CoordinatorConfig
from .declaration import DeclarationPublisher
from .driver import WindowDriver
from .registry import Registry
from .servicer import CoordinatorServicer
from .store import CoordinatorStore

PARTY = "coordinator"
log = structlog.get_logger(__name__)


def load_config(tables: dict[str, Any], windows: int | None) -> CoordinatorConfig:
    body = dict(tables.get("coordinator", {}))
    for name in ("inner", "window", "outer", "secagg", "staleness", "controller"):
        if name in tables:
            body[name] = tables[name]
    if windows is not None:
        body["windows"] = windows
    return build(CoordinatorConfig, body, "coordinator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echelon-coordinator", description=__doc__)
    common_arguments(parser)
    parser.add_argument("--windows", type=int, help="stop after this many windows (0 = never)")
    args = parser.parse_args(argv)
    try:
        tables = load_tables(args)
        common = common_config(tables, args)
        config = load_config(tables, args.windows)
    except ConfigFileError as exc:
        print(f"echelon-coordinator: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging("coordinator", common.log_level)
    identity = load_or_create_identity(PARTY, common.data_dir / "identity")
    policy = config.policy()
    audit, audit_channel = audited_peer(PARTY, Role.COORDINATOR, identity, policy, common.audit)
    store = CoordinatorStore(common.data_dir / "state")
    registry = Registry(store)
    driver = WindowDriver(config=config, store=store, registry=registry, audit=audit)
    declaration = DeclarationPublisher(config=config, registry=registry, store=store, audit=audit)
    servicer = CoordinatorServicer(
        registry=registry, driver=driver, audit=audit, run_config=declaration
    )
    running = start_server(
        common.server,
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
        ["echelon.coordinator.v1.Coordinator"],
    )
    metrics_port = start_metrics(common.metrics_host, common.metrics_port)
    write_port_file(args.port_file, grpc=running.port, metrics=metrics_port)
    log.info(
        "coordinator_ready",
        port=running.port,
        metrics_port=metrics_port,
        run_id=config.run_id,
        version=driver.version,
    )
    stop = threading.Event()
    loop = threading.Thread(target=driver.run, args=(stop,), name="windows", daemon=True)
    loop.start()
    watch_audit_log(common, audit, audit_channel, stop)

    def shutdown() -> None:
        stop.set()
        loop.join(timeout=config.rpc_timeout_s)
        driver.close()
        audit_channel.close()
        store.close()

    wait_for_signal(running, shutdown, common.server.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
