"""Starts a multi-site Echelon deployment as local processes on loopback.

One audit log, one coordinator and one boundary agent per organization (each agent
spawning its device workers), every service a real process with its own TOML file,
state directory and log file, on ephemeral ports read back from port files. The
demo and the end-to-end tests use this one launcher.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from echelon.audit.checkpoint import VERIFIER_KEY_FILE
from echelon.tomlconfig import dumps
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from echelon_tools.wan import ProxyHost
from services.audit_log.server import DB_FILE
from services.common.wire import new_ref


class LaunchError(RuntimeError):
    """A service did not come up; the message names it and points at its log."""


@dataclass(frozen=True, kw_only=True)
class Site:
    """One organization: its id, private text files and device count."""

    boundary: str
    data_files: tuple[Path, ...]
    workers: int = 2
    wan_delay_s: float = 0.0  # one-way delay to and from the global plane (a delaying proxy)
    bandwidth_mbps: float | None = None  # cap on that link, per direction
    # The global plane's address as this organization reaches it: its delaying proxies listen
    # there, in the launcher's network namespace (echelon_tools.netns). None: loopback.
    wan_host: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeploymentSpec:
    root: Path
    sites: tuple[Site, ...]
    tokenizer_files: tuple[Path, ...]
    coordinator_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_level: str = "info"
    # mTLS: provision a development federation (one kit per party, plus an auditor kit
    # `operator` that this launcher calls with) and run every service from its kit.
    # False: every service is told `insecure = true` (plaintext, said in the audit log).
    mtls: bool = False
    # Without mTLS: whether the services know the log's key (witnessing, and a proof in the
    # answer to every append); False runs without both, the baseline `bench_trust` compares.
    witness: bool = True
    # Per service name: a prefix for its command line, e.g. ("ip", "netns", "exec", "ech-org-a").
    command_prefix: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Per service name: the address this launcher's caller dials it at, where 127.0.0.1 does not
    # reach it (a service in another network namespace: a unix socket relayed into it).
    observe_at: dict[str, str] = field(default_factory=dict)


OPERATOR = "operator"  # the launcher's own party: an auditor (reads status and the log)
KITS = "kits"


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    port_file: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    dial: str | None = None  # where the caller reaches it, if not 127.0.0.1:<grpc port>

    @property
    def address(self) -> str:
        return self.dial or f"127.0.0.1:{self.ports['grpc']}"


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(v) for k, v in base.items()}
    for name, table in extra.items():
        out.setdefault(name, {}).update(table)
    return out


class Deployment:
    """The processes of one deployment; stop() ends them all (also on errors)."""

    def __init__(self, spec: DeploymentSpec) -> None:
        spec = dataclasses.replace(spec, root=spec.root.resolve())
        self.spec = spec
        self.services: dict[str, Service] = {}
        self._wan: ProxyHost | None = None
        (spec.root / "logs").mkdir(parents=True, exist_ok=True)
        (spec.root / "config").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, module: str, args: list[str]) -> Service:
        port_file = self.spec.root / "run" / f"{name}.json"
        port_file.unlink(missing_ok=True)
        log_path = self.spec.root / "logs" / f"{name}.log"
        # The files written here are complete: an operator's ECHELON_* variables (which
        # override files) must not reach a local deployment's services.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHELON_")}
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    *self.spec.command_prefix.get(name, ()),
                    sys.executable,
                    "-m",
                    module,
                    *args,
                    "--port-file",
                    str(port_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        service = Service(name, process, port_file, log_path, dial=self.spec.observe_at.get(name))
        self.services[name] = service
        return service

    def _wait(self, service: Service, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if service.port_file.exists():
                service.ports = json.loads(service.port_file.read_text())
                return
            if service.process.poll() is not None:
                tail = service.log_path.read_text(errors="replace")[-3000:]
                raise LaunchError(
                    f"{service.name} exited with {service.process.returncode}; "
                    f"log {service.log_path}:\n{tail}"
                )
            time.sleep(0.1)
        raise LaunchError(
            f"{service.name} did not start within {timeout_s:.0f}s; see {service.log_path}"
        )

    def _write(self, name: str, tables: dict[str, Any]) -> Path:
        path = self.spec.root / "config" / f"{name}.toml"
        path.write_text(dumps(tables))
        return path

    def start(self, timeout_s: float = 300.0) -> None:
        """Starts audit log, coordinator and agents, waiting for each to listen (with
        `mtls`, first provisions the federation the services run from)."""
        spec = self.spec
        try:
            if spec.mtls:
                self._provision()
            audit_cfg = self._write("audit-log", {"service": self._service_table("audit-log")})
            audit = self._spawn("audit-log", "services.audit_log", ["--config", str(audit_cfg)])
            self._wait(audit, 60)
            coordinator_cfg = self._write(
                "coordinator",
                _merge(
                    {"service": self._service_table("coordinator", audit_log=audit.address)},
                    spec.coordinator_tables,
                ),
            )
            coordinator = self._spawn(
                "coordinator", "services.global_coordinator", ["--config", str(coordinator_cfg)]
            )
            self._wait(coordinator, 60)
            agents = []
            for site in spec.sites:
                coordinator_at, audit_at = self._wan_links(
                    site, coordinator.ports["grpc"], audit.ports["grpc"]
                )
                cfg = self._write(site.boundary, self._agent_tables(site, coordinator_at, audit_at))
                agents.append(
                    self._spawn(site.boundary, "services.boundary_agent", ["--config", str(cfg)])
                )
            for agent in agents:
                self._wait(agent, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _agent_tables(self, site: Site, coordinator_at: str, audit_at: str) -> dict[str, Any]:
        return _merge(
            {
                "service": self._service_table(
                    site.boundary, audit_log=audit_at, coordinator=coordinator_at
                ),
                "agent": {"boundary": site.boundary},
                "devices": {"workers": site.workers},
                "data": {"files": [str(p.resolve()) for p in site.data_files]},
                "tokenizer": {"files": [str(p.resolve()) for p in self.spec.tokenizer_files]},
            },
            self.spec.agent_tables,
        )

    def _provision(self) -> None:
        """A development federation in `root/kits`: the model identity as the first site's
        agent computes it (`--print-model`), the declaration as the coordinator's tables
        make it, one kit per party and the operator's (an auditor)."""
        from .provision import FederationSpec, agent_model, coordinator_declaration, provision

        spec = self.spec
        site = spec.sites[0]
        cfg = self._write(site.boundary, self._agent_tables(site, "127.0.0.1:1", "127.0.0.1:1"))
        try:
            model = agent_model(cfg)
        except RuntimeError as exc:
            raise LaunchError(str(exc)) from None
        service = {"service": {"data_dir": str(spec.root / "coordinator")}}
        coordinator_cfg = self._write("coordinator", _merge(service, spec.coordinator_tables))
        provision(
            FederationSpec(
                declaration=coordinator_declaration(coordinator_cfg, model),
                boundaries=tuple(s.boundary for s in spec.sites),
                auditors=(OPERATOR,),
            ),
            self.kits,
            now=datetime.now(UTC),
        )

    @property
    def kits(self) -> Path:
        return self.spec.root / KITS

    @property
    def manifest(self) -> Path | None:
        """The signed manifest the services run under (None: an insecure deployment)."""
        return self.kits / OPERATOR / "manifest.json" if self.spec.mtls else None

    def channel(self, name: str) -> grpc.Channel:
        """A channel to service `name` (coordinator, audit-log): mTLS as the operator."""
        address = self.services[name].address
        if not self.spec.mtls:
            return grpc.insecure_channel(address)
        from echelon.trust.kit import load_kit
        from services.common.tls import secure_channel

        return secure_channel(address, load_kit(self.kits / OPERATOR), name)

    def _wan_links(self, site: Site, coordinator_port: int, audit_port: int) -> tuple[str, str]:
        """The addresses an organization dials out to (coordinator, audit log): direct, or
        through delaying proxies, so that every link to the global plane crosses the WAN."""
        if site.wan_delay_s <= 0 and site.bandwidth_mbps is None and site.wan_host is None:
            return f"127.0.0.1:{coordinator_port}", f"127.0.0.1:{audit_port}"
        if self._wan is None:
            self._wan = ProxyHost()
        host = site.wan_host or "127.0.0.1"
        to_coordinator = self._wan.proxy(
            coordinator_port, site.wan_delay_s, site.bandwidth_mbps, listen_host=host
        )
        to_audit = self._wan.proxy(
            audit_port, site.wan_delay_s, site.bandwidth_mbps, listen_host=host
        )
        return f"{host}:{to_coordinator}", f"{host}:{to_audit}"

    def agent_config(self, boundary: str) -> Path:
        return self.spec.root / "config" / f"{boundary}.toml"

    @property
    def coordinator_state(self) -> Path:
        return self.spec.root / "coordinator" / "state"

    @property
    def audit_db(self) -> Path:
        return self.spec.root / "audit-log" / DB_FILE

    def _service_table(self, name: str, **dials: str) -> dict[str, Any]:
        """A service's [service] table: loopback on ephemeral ports (read back from its port
        file), its state directory, and whom it dials (`audit_log`, `coordinator`): the
        audit log with its verifier key, so that the service witnesses it."""
        table: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "data_dir": str(self.spec.root / name),
            "log_level": self.spec.log_level,
            **dials,
        }
        if self.spec.mtls:  # the log's key comes from the manifest
            table["kit"] = str(self.kits / name)
        else:
            table["insecure"] = True
            if "audit_log" in dials and self.spec.witness:
                table["audit_key"] = str(self.spec.root / "audit-log" / VERIFIER_KEY_FILE)
        return table

    def coordinator_status(self, timeout_s: float = 5.0) -> coordinator_pb2.CoordinatorStatus:
        with self.channel("coordinator") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return stub.GetStatus(
                coordinator_pb2.GetStatusRequest(ref=new_ref(0)), timeout=timeout_s
            )

    def wait_windows(self, windows: int, timeout_s: float, on_poll: Any = None) -> int:
        """Waits until `windows` windows committed; returns the count. Raises LaunchError."""
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            for service in self.services.values():
                if service.process.poll() is not None:
                    raise LaunchError(
                        f"{service.name} exited with {service.process.returncode}; "
                        f"see {service.log_path}"
                    )
            status = self.coordinator_status()
            if on_poll is not None:
                on_poll(status)
            if status.windows_completed >= windows:
                return int(status.windows_completed)
            time.sleep(1.0)
        raise LaunchError(f"{windows} windows not done within {timeout_s:.0f}s")

    def stop(self, grace_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM to every service (agents first), then SIGKILL after `grace_s`; the WAN
        links stay up until every service stopped (an agent's last audit appends cross
        them on its way out)."""
        order = [s for n, s in self.services.items() if n not in ("coordinator", "audit-log")]
        order += [self.services[n] for n in ("coordinator", "audit-log") if n in self.services]
        codes: dict[str, int | None] = {}
        for service in order:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
            try:
                codes[service.name] = service.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(service.process.pid, signal.SIGKILL)
                codes[service.name] = service.process.wait()
        if self._wan is not None:
            self._wan.stop()
            self._wan = None
        return codes
