"""The services' shared settings and their one precedence, for all three services:
built-in defaults < the TOML file (`--config`) < `ECHELON_*` environment < flags.

Every service reads the same `[service]` table (where it listens, its metrics, state,
logs, and the addresses it dials) plus tables of its own; the defaults meet: an agent
with no configuration dials the coordinator's and the audit log's default ports.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from echelon.tomlconfig import ConfigFileError, build, load_toml, toml_value

from .server import ServerConfig

T = TypeVar("T")

COORDINATOR_PORT, AUDIT_LOG_PORT, AGENT_PORT = 50051, 50052, 50053
COORDINATOR_METRICS_PORT, AUDIT_LOG_METRICS_PORT, AGENT_METRICS_PORT = 9451, 9452, 9453
ENV_PREFIX = "ECHELON_"
LOG_LEVELS = ("debug", "info", "warning", "error")
_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>[0-9]{1,5})")


def _bad(key: str, value: object, want: str) -> ConfigFileError:
    return ConfigFileError(f"[service].{key}: got {value!r}, want {want}", key=f"service.{key}")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """[service]: where a service listens, its metrics, state and logs, and whom it dials.

    The per-service defaults of the first five keys are in `ServiceSpec.defaults`."""

    host: str  # the gRPC server's bind address
    port: int  # 0: ephemeral (`--port-file` reports it)
    metrics_host: str  # the Prometheus endpoint's bind address
    metrics_port: int  # 0: ephemeral; -1: off
    data_dir: Path  # durable state: identity key, stores
    log_level: str = "info"
    audit_log: str = f"127.0.0.1:{AUDIT_LOG_PORT}"  # host:port of the audit log
    audit_key: str = ""  # the log's verifier key (a file or the key text); "" = do not witness
    coordinator: str = f"127.0.0.1:{COORDINATOR_PORT}"  # host:port an agent dials out to
    witness_s: float = 10.0  # how often to check the log's signed tree head
    max_workers: int = 16  # gRPC server threads
    grace_s: float = 5.0  # in-flight calls get this long on SIGTERM
    health_port: int = -1  # plaintext gRPC health only (Kubernetes probes); -1: off
    # mTLS: the party's kit directory (`echelon provision` / `echelon keygen`), and the
    # federation root's public key received out of band ("": the kit's root.pub). Without a
    # kit a service runs only with `insecure = true`: plaintext, said in the audit log.
    kit: str = ""
    root_key: str = ""
    insecure: bool = False

    def __post_init__(self) -> None:
        for key in ("host", "metrics_host"):
            value = getattr(self, key)
            if not value or any(c.isspace() for c in value):
                raise _bad(key, value, "an address to bind, e.g. 0.0.0.0, 127.0.0.1 or ::")
        if not 0 <= self.port <= 65535:
            raise _bad("port", self.port, "0..65535 (0 = ephemeral)")
        if not -1 <= self.metrics_port <= 65535:
            raise _bad("metrics_port", self.metrics_port, "-1..65535 (0 = ephemeral, -1 = off)")
        if self.metrics_port > 0 and self.metrics_port == self.port:
            raise _bad("metrics_port", self.metrics_port, f"a port other than port={self.port}")
        if self.log_level not in LOG_LEVELS:
            raise _bad("log_level", self.log_level, f"one of {', '.join(LOG_LEVELS)}")
        for key in ("audit_log", "coordinator"):
            value = getattr(self, key)
            match = _ADDRESS.fullmatch(value)
            if match is None or not 1 <= int(match["port"]) <= 65535:
                raise _bad(key, value, "HOST:PORT with a port in 1..65535, e.g. 10.0.0.5:50051")
        if not self.witness_s > 0:
            raise _bad("witness_s", self.witness_s, "> 0 seconds")
        if self.max_workers < 2:
            raise _bad("max_workers", self.max_workers, ">= 2")
        if self.grace_s < 0:
            raise _bad("grace_s", self.grace_s, ">= 0 seconds")
        if not -1 <= self.health_port <= 65535:
            raise _bad("health_port", self.health_port, "-1..65535 (0 = ephemeral, -1 = off)")
        if self.health_port > 0 and self.health_port in (self.port, self.metrics_port):
            raise _bad("health_port", self.health_port, "a port other than port and metrics_port")
        if self.kit and self.insecure:
            raise _bad("insecure", True, "false when a kit is given (mTLS), or no kit")
        if self.root_key and not self.kit:
            raise _bad("root_key", self.root_key, "empty without a kit (it checks the kit)")

    def require_transport(self) -> None:
        """Raises ConfigFileError unless the service has a kit (mTLS) or was told
        `insecure = true`: plaintext is never what a service falls back to."""
        if not self.kit and not self.insecure:
            raise _bad(
                "kit",
                "",
                "a kit directory from `echelon provision` or `echelon keygen` (mTLS), or "
                "insecure = true (--insecure) for plaintext",
            )

    @property
    def server(self) -> ServerConfig:
        return ServerConfig(
            host=self.host,
            port=self.port,
            max_workers=self.max_workers,
            grace_s=self.grace_s,
            health_port=self.health_port,
        )


@dataclass(frozen=True)
class Setting:
    """One setting that the environment and flags can set, besides the file."""

    table: str
    key: str
    kind: type  # int, float, str, Path or bool (a flag without a value)
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


SERVICE_SETTINGS = (
    Setting("service", "host", str, "address the gRPC server binds"),
    Setting("service", "port", int, "gRPC port; 0 = ephemeral"),
    Setting("service", "metrics_host", str, "address the Prometheus endpoint binds"),
    Setting("service", "metrics_port", int, "Prometheus port; 0 = ephemeral, -1 = off"),
    Setting("service", "data_dir", Path, "durable state directory"),
    Setting("service", "log_level", str, "debug, info, warning or error"),
    Setting("service", "max_workers", int, "gRPC server threads"),
    Setting("service", "grace_s", float, "seconds in-flight calls get on SIGTERM"),
    Setting("service", "health_port", int, "plaintext gRPC health-only port; -1 = off"),
    Setting("service", "audit_log", str, "HOST:PORT of the audit log"),
    Setting("service", "audit_key", str, "the audit log's verifier key: a file or the key text"),
    Setting("service", "witness_s", float, "seconds between checks of the log's tree head"),
    Setting("service", "coordinator", str, "HOST:PORT of the coordinator"),
    Setting("service", "kit", Path, "the party's kit directory (mTLS, manifest, keys)"),
    Setting("service", "root_key", Path, "the federation root's root.pub, received out of band"),
    Setting("service", "insecure", bool, "plaintext without a kit (logged, audited)"),
)
_BY_KEY = {s.key: s for s in SERVICE_SETTINGS}
_LISTENING: tuple[str, ...] = ("host", "port", "metrics_host", "metrics_port", "data_dir")
_LISTENING = (*_LISTENING, "log_level", "max_workers", "grace_s", "health_port")
_LISTENING = (*_LISTENING, "kit", "root_key", "insecure")
_AUDITED = ("audit_log", "audit_key", "witness_s")


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """What one service reads: its tables, the settings env and flags reach, its defaults."""

    prog: str
    tables: tuple[str, ...]  # the tables its file may hold; [service] is one of them
    settings: tuple[Setting, ...]  # [service] keys it reads, then its own settings
    defaults: Mapping[str, Any] = field(default_factory=dict)  # per-service [service] values

    @property
    def service_keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.settings if s.table == "service")


AUDIT_LOG = ServiceSpec(
    prog="echelon-audit-log",
    tables=("service", "audit_log"),
    settings=(
        *(_BY_KEY[k] for k in _LISTENING),
        Setting("audit_log", "origin", str, "first line of every checkpoint"),
    ),
    defaults={
        "host": "0.0.0.0",
        "port": AUDIT_LOG_PORT,
        "metrics_host": "0.0.0.0",
        "metrics_port": AUDIT_LOG_METRICS_PORT,
        "data_dir": "var/audit-log",
    },
)
COORDINATOR = ServiceSpec(
    prog="echelon-coordinator",
    tables=(
        *("service", "coordinator", "inner", "window", "outer", "secagg", "staleness"),
        *("controller", "stats"),
    ),
    settings=(
        *(_BY_KEY[k] for k in (*_LISTENING, *_AUDITED)),
        Setting("coordinator", "windows", int, "stop after this many windows (0 = never)"),
    ),
    defaults={
        "host": "0.0.0.0",
        "port": COORDINATOR_PORT,
        "metrics_host": "0.0.0.0",
        "metrics_port": COORDINATOR_METRICS_PORT,
        "data_dir": "var/coordinator",
    },
)
# An agent accepts no connection from outside its organization: its status, health and
# metrics endpoints are for the organization's own operators, on loopback by default.
BOUNDARY_AGENT = ServiceSpec(
    prog="echelon-boundary-agent",
    tables=(
        *("service", "agent", "devices", "data", "tokenizer", "model", "lora", "inner"),
        *("policy", "floor"),
    ),
    settings=(
        *(_BY_KEY[k] for k in (*_LISTENING, *_AUDITED, "coordinator")),
        Setting("agent", "boundary", str, "the organization's id"),
    ),
    defaults={
        "host": "127.0.0.1",
        "port": AGENT_PORT,
        "metrics_host": "127.0.0.1",
        "metrics_port": AGENT_METRICS_PORT,
        "data_dir": "var/agent",
    },
)
SPECS = (AUDIT_LOG, COORDINATOR, BOUNDARY_AGENT)
# What moved when the three schemas became one; named in the error instead of "unknown".
_MOVED = {
    ("server", None): "[service] (host, port, max_workers, grace_s)",
    ("metrics", None): "[service] (metrics_host, metrics_port)",
    ("logging", None): "[service].log_level",
    ("service", "audit"): "[service].audit_log",
    ("agent", "coordinator"): "[service].coordinator",
    ("audit_log", "data_dir"): "[service].data_dir",
    ("audit_log", "server"): "[service] (host, port, max_workers, grace_s)",
}


def add_arguments(parser: argparse.ArgumentParser, spec: ServiceSpec) -> None:
    """--config, one flag per setting of `spec`, --port-file and --print-config."""
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    for s in spec.settings:
        if s.kind is bool:
            parser.add_argument(
                s.flag,
                dest=s.key,
                action="store_const",
                const=True,
                help=f"{s.help} ([{s.table}].{s.key}, {s.env}=1)",
            )
            continue
        parser.add_argument(
            s.flag,
            dest=s.key,
            type=str if s.kind is Path else s.kind,
            metavar=s.key.upper(),
            help=f"{s.help} ([{s.table}].{s.key}, {s.env})",
        )
    parser.add_argument("--port-file", type=Path, help="write the bound ports here as JSON")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings and where each came from, then exit",
    )


@dataclass(frozen=True)
class Resolved:
    """A service's tables after layering, and where each layered setting came from."""

    spec: ServiceSpec
    tables: dict[str, dict[str, Any]]
    sources: dict[str, str]  # "table.key" -> "default", the file's path, "ECHELON_X" or "--x"
    base: Path  # relative paths in the file are relative to it

    def build(self, cls: type[T], table: Mapping[str, Any] | None, where: str) -> T:
        """`echelon.tomlconfig.build`, its errors saying which source set the bad value."""
        try:
            return build(cls, table, where)
        except ConfigFileError as exc:
            raise ConfigFileError(self._explain(exc, where), key=exc.key) from None

    def service(self) -> ServiceConfig:
        return self.build(ServiceConfig, self.tables["service"], "service")

    def _explain(self, exc: ConfigFileError, where: str) -> str:
        if exc.key is not None and exc.key in self.sources:
            source = self.sources[exc.key]
            value = self._value(exc.key)
            if source.startswith(("--", ENV_PREFIX)):
                return f"{exc} (set by {source}={value})"
            return f"{exc} ({'built-in default' if source == 'default' else 'in ' + source})"
        # A check across keys: name every source of the table's values.
        of_table = {k: v for k, v in self.sources.items() if k.startswith(where + ".")}
        overridden = {k: v for k, v in of_table.items() if v.startswith(("--", ENV_PREFIX))}
        files = sorted(set(of_table.values()) - set(overridden.values()) - {"default"})
        said = [f"in {f}" for f in files]
        said += [f"set by {v}={self._value(k)}" for k, v in overridden.items()]
        return f"{exc} ({'; '.join(said)})" if said else str(exc)

    def _value(self, key: str) -> str:
        table, _, name = key.partition(".")
        value = self.tables.get(table, {}).get(name)
        return str(value) if isinstance(value, str | Path) else toml_value(value)

    def render(self, service: ServiceConfig, **owners: object) -> str:
        """The effective settings as TOML, each with its source; `owners` maps a table to
        the built object that holds its settings (the coordinator's config, ...)."""
        lines = [f"# {self.spec.prog}: defaults < file < {ENV_PREFIX}* < flags"]
        table = ""
        for s in self.spec.settings:
            if s.table != table:
                table = s.table
                lines.append(f"\n[{table}]" if len(lines) > 1 else f"[{table}]")
            holder = service if s.table == "service" else owners[s.table]
            source = self.sources.get(f"{s.table}.{s.key}", "default")
            text = f"{s.key} = {toml_value(getattr(holder, s.key))}"
            lines.append(f"{text:<44} # {source}")
        return "\n".join(lines) + "\n"


def resolve(spec: ServiceSpec, args: argparse.Namespace, environ: Mapping[str, str]) -> Resolved:
    """Layers defaults, the file, the environment and the flags, in that order.

    Raises ConfigFileError naming the file, variable or flag, the key, the value and
    what was expected: for an unknown table, key or `ECHELON_*` variable, or a value of
    the wrong type. Values are range-checked when `Resolved.build` builds them.
    """
    path: Path | None = args.config
    file = load_toml(path) if path is not None else {}
    where = str(path)
    for name, value in file.items():
        if name not in spec.tables or not isinstance(value, dict):
            moved = _MOVED.get((name, None))
            want = f"moved to {moved}" if moved else f"want one of [{'], ['.join(spec.tables)}]"
            raise ConfigFileError(f"{where}: [{name}]: unknown table for {spec.prog}; {want}")
        for key in value:
            if (name, key) in _MOVED:
                raise ConfigFileError(
                    f"{where}: [{name}].{key} moved to {_MOVED[name, key]}", key=f"{name}.{key}"
                )
    unknown = sorted(set(file.get("service", {})) - set(spec.service_keys))
    if unknown:
        raise ConfigFileError(
            f"{where}: [service].{unknown[0]} = {file['service'][unknown[0]]!r}: not a setting "
            f"of {spec.prog}; want one of {', '.join(sorted(spec.service_keys))}",
            key=f"service.{unknown[0]}",
        )
    base = path.resolve().parent if path is not None else Path.cwd()
    defaults = {f.name: f.default for f in fields(ServiceConfig) if f.name in spec.service_keys}
    tables: dict[str, dict[str, Any]] = {name: dict(table) for name, table in file.items()}
    sources = {f"service.{key}": "default" for key in (*defaults, *spec.defaults)}
    for name, table in file.items():
        sources.update({f"{name}.{key}": where for key in table})
    tables["service"] = {**defaults, **spec.defaults, **_relative_to(file.get("service"), base)}
    own = {s.env: s for s in spec.settings}
    known = {s.env for x in SPECS for s in x.settings}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in known:
            raise ConfigFileError(
                f"{name}={environ[name]}: unknown variable; want one of {', '.join(sorted(known))}"
            )
        setting = own.get(name)
        if setting is not None:  # another service's variable (a shared env file) is ignored
            value = _parse(setting, environ[name])
            tables.setdefault(setting.table, {})[setting.key] = value
            sources[f"{setting.table}.{setting.key}"] = name
    for s in spec.settings:
        value = getattr(args, s.key, None)
        if value is not None:
            tables.setdefault(s.table, {})[s.key] = value
            sources[f"{s.table}.{s.key}"] = s.flag
    return Resolved(spec, tables, sources, base)


def _relative_to(table: Mapping[str, Any] | None, base: Path) -> dict[str, Any]:
    """The file's [service] table, where a relative data_dir, and a relative audit_key that
    names a file beside the file, are relative to the file's directory (as the agent's data
    files are); from the environment or flags they are relative to the working directory."""
    service = dict(table or {})
    data_dir = service.get("data_dir")
    if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
        service["data_dir"] = str(base / data_dir)
    key = service.get("audit_key")
    if isinstance(key, str) and key and not Path(key).is_absolute() and (base / key).is_file():
        service["audit_key"] = str(base / key)
    for name in ("kit", "root_key"):
        value = service.get(name)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            service[name] = str(base / value)
    return service


def _parse(setting: Setting, text: str) -> Any:
    """An environment variable's text as the setting's type."""
    if setting.kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ConfigFileError(
            f"{setting.env}={text!r}: want 1/true/yes/on or 0/false/no/off "
            f"([{setting.table}].{setting.key})",
            key=f"{setting.table}.{setting.key}",
        )
    try:
        return str(text) if setting.kind is Path else setting.kind(text)
    except ValueError:
        want = "an integer" if setting.kind is int else "a number"
        raise ConfigFileError(
            f"{setting.env}={text!r}: want {want} ([{setting.table}].{setting.key})",
            key=f"{setting.table}.{setting.key}",
        ) from None
