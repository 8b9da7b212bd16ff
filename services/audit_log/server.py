"""Builds the audit log server from its configuration: data dir, log key, store, servicer.

The data dir holds `log.db` (the SQLite store), `log.key` (the log's Ed25519 seed,
mode 0600) and `log.vkey` (the verifier key parties and auditors use).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from echelon.audit import LogSigner, SqliteLogStore, TransparencyLog
from echelon.audit.checkpoint import VERIFIER_KEY_FILE
from echelon.audit.log import DEFAULT_CHECKPOINT_EVERY
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from services.common.server import RunningServer, ServerConfig, start_server
from services.common.transport import Transport
from services.common.validate import NonceGuard

from .servicer import AuditLogServicer

log = structlog.get_logger(__name__)
SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditLog"].full_name
DB_FILE, KEY_FILE = "log.db", "log.key"


@dataclass(frozen=True, kw_only=True)
class AuditLogConfig:
    """Everything the audit log service needs; built by `main()` from TOML and flags."""

    data_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    origin: str = "echelon.audit/log"  # first line of every checkpoint
    key_name: str = "echelon-audit-log"  # the log key's name in signed notes
    nonce_capacity: int = 65536
    # Appends after which the log signs a tree head unasked (GetTreeHead always signs one
    # over every entry); 1 signs one per append, at about an Ed25519 signature each.
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    # When quiet, the log signs its tail (a head over every entry) at least this often, so
    # no entry stays uncovered by a signed head for longer; 0: only when asked.
    sign_every_s: float = 5.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\x21-\x7e][\x20-\x7e]{0,254}", self.origin):
            raise ValueError(f"AuditLogConfig.origin: got {self.origin!r}, want printable ASCII")
        if not re.fullmatch(r"[^\s+]{1,128}", self.key_name):
            raise ValueError(
                f"AuditLogConfig.key_name: got {self.key_name!r}, want no spaces or '+'"
            )
        if self.nonce_capacity < 1024:
            raise ValueError(
                f"AuditLogConfig.nonce_capacity: got {self.nonce_capacity}, want >= 1024"
            )
        if self.sign_every_s < 0:
            raise ValueError(f"AuditLogConfig.sign_every_s: got {self.sign_every_s}, want >= 0")
        if self.checkpoint_every < 1:
            raise ValueError(
                f"AuditLogConfig.checkpoint_every: got {self.checkpoint_every}, want >= 1"
            )


def load_log_signer(config: AuditLogConfig, transport: Transport | None = None) -> LogSigner:
    """The log key: with a kit, the audit key the manifest names for the log (under the
    log's party id, so parties derive its verifier key from the manifest); else read from
    the data dir, created (0600) on first start."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if transport is not None and transport.kit is not None:
        kit = transport.kit
        signer = LogSigner(name=kit.party.party_id, origin=config.origin, private_key=kit.audit_key)
        (config.data_dir / VERIFIER_KEY_FILE).write_text(signer.verifier_key() + "\n")
        return signer
    key_path = config.data_dir / KEY_FILE
    if not key_path.exists():
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
            f.flush()
            os.fsync(f.fileno())
        log.info("log_key_created", path=str(key_path))
    signer = LogSigner.from_seed(
        name=config.key_name, origin=config.origin, seed=key_path.read_bytes()
    )
    (config.data_dir / VERIFIER_KEY_FILE).write_text(signer.verifier_key() + "\n")
    return signer


@dataclass
class AuditLogServer(RunningServer):
    """A running audit log server; `stop` also closes the store."""

    log: TransparencyLog | None = None
    quiet: threading.Event = field(default_factory=threading.Event)  # set: stop signing

    def stop(self, grace_s: float = 5.0) -> None:
        self.quiet.set()
        super().stop(grace_s)
        if self.log is not None:
            self.log.close()
            self.log = None


def create_server(config: AuditLogConfig, transport: Transport | None = None) -> AuditLogServer:
    """Opens (or creates) the durable log in `config.data_dir` and serves it: with a kit
    (`transport`), over mTLS, to the manifest's parties only, each signing as itself.

    Raises StoreCorrupted when the stored log does not match its own tree heads,
    RuntimeError when the address cannot be bound.
    """
    signer = load_log_signer(config, transport)
    manifest = None if transport is None else transport.manifest
    transparency_log = TransparencyLog(
        store=SqliteLogStore(config.data_dir / DB_FILE),
        signer=signer,
        checkpoint_every=config.checkpoint_every,
        pinned=None if manifest is None else manifest.audit_signers(),
    )
    servicer = AuditLogServicer(transparency_log, NonceGuard(config.nonce_capacity), transport)

    def register(server: grpc.Server) -> None:
        audit_pb2_grpc.add_AuditLogServicer_to_server(servicer, server)

    try:
        running = start_server(
            config.server,
            register,
            [SERVICE_NAME],
            credentials=None if transport is None else transport.server_credentials(),
        )
    except BaseException:
        transparency_log.close()
        raise
    server = AuditLogServer(
        server=running.server,
        port=running.port,
        health=running.health,
        health_server=running.health_server,  # kept, or the health-only server is collected
        health_port=running.health_port,
        log=transparency_log,
    )
    if config.sign_every_s > 0:
        threading.Thread(
            target=_sign_tail,
            args=(transparency_log, config.sign_every_s, server.quiet),
            name="sign-tail",
            daemon=True,
        ).start()
    return server


def _sign_tail(log_: TransparencyLog, every_s: float, stop: threading.Event) -> None:
    """Signs a head over the tail whenever entries are uncovered (`tree_head` signs only
    then), every `every_s` seconds until `stop`."""
    while not stop.wait(every_s):
        try:
            log_.tree_head()
        except Exception as exc:  # a closed store at shutdown; anything else: try again
            if stop.is_set():
                return
            log.error("tail_not_signed", error=str(exc))
