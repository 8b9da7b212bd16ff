"""Durable coordinator state: registrations, global versions and the outer optimizer.

SQLite (WAL, synchronous=FULL) holds the rows; adapter vectors and the momentum
buffer are `.npy` files written atomically (temp file, fsync, rename) before the row
that names them is committed, so a restart resumes at the last committed version.
Versions are never updated or deleted: every global adapter is kept for export
and replay.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echelon.protocol import CoordinatorState
from services.common.wire import vector_sha256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS boundaries (
    boundary TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    identity_key BLOB NOT NULL,
    devices INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    window INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    contributors TEXT NOT NULL,
    weight_sum REAL NOT NULL,
    created_ms INTEGER NOT NULL,
    aggregate_sha256 BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS versions_no_update BEFORE UPDATE ON versions
BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS versions_no_delete BEFORE DELETE ON versions
BEGIN SELECT RAISE(ABORT, 'versions are append-only'); END;
"""


@dataclass(frozen=True)
class Registration:
    boundary: str
    address: str
    identity_key: bytes
    devices: int


@dataclass(frozen=True)
class VersionRecord:
    version: int
    window: int
    sha256: bytes
    contributors: tuple[str, ...]
    weight_sum: float
    created_ms: int
    aggregate_sha256: bytes


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class CoordinatorStore:
    """The coordinator's durable state under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "versions").mkdir(parents=True, exist_ok=True)
        (root / "aggregates").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(root / "coordinator.db", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- registrations -------------------------------------------------------------------
    def register(self, reg: Registration, now_ms: int) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO boundaries VALUES(?, ?, ?, ?, ?) ON CONFLICT(boundary) DO UPDATE "
                "SET address = excluded.address, devices = excluded.devices",
                (reg.boundary, reg.address, reg.identity_key, reg.devices, now_ms),
            )

    def registrations(self) -> dict[str, Registration]:
        with self._lock:
            rows = self._db.execute(
                "SELECT boundary, address, identity_key, devices FROM boundaries"
            ).fetchall()
        return {r[0]: Registration(r[0], r[1], bytes(r[2]), int(r[3])) for r in rows}

    # -- versions ------------------------------------------------------------------------
    def save_version(
        self,
        record: VersionRecord,
        phi: np.ndarray,
        momentum: np.ndarray | None,
        aggregate: np.ndarray | None,
    ) -> None:
        """Writes the adapter (and optimizer state, aggregate) files, then commits the row."""
        _atomic_save(self.root / "versions" / f"v{record.version:06d}.npy", phi)
        if momentum is not None:
            _atomic_save(self.root / "versions" / f"m{record.version:06d}.npy", momentum)
        if aggregate is not None:
            _atomic_save(self.root / "aggregates" / f"w{record.window:06d}.npy", aggregate)
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO versions VALUES(?, ?, ?, ?, ?, ?, ?)",
                (
                    record.version,
                    record.window,
                    record.sha256,
                    json.dumps(list(record.contributors)),
                    record.weight_sum,
                    record.created_ms,
                    record.aggregate_sha256,
                ),
            )

    def versions(self) -> list[VersionRecord]:
        """Every stored version, oldest first."""
        return self._select(" ORDER BY version")

    def _select(self, order: str) -> list[VersionRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT version, window, sha256, contributors, weight_sum, created_ms, "
                "aggregate_sha256 FROM versions" + order
            ).fetchall()
        return [
            VersionRecord(
                int(r[0]),
                int(r[1]),
                bytes(r[2]),
                tuple(json.loads(r[3])),
                float(r[4]),
                int(r[5]),
                bytes(r[6]),
            )
            for r in rows
        ]

    def latest_version(self) -> VersionRecord | None:
        versions = self._select(" ORDER BY version DESC LIMIT 1")
        return versions[0] if versions else None

    def load_adapter(self, version: int) -> np.ndarray:
        """The global adapter of `version` (offset from the initial adapter); KeyError if absent."""
        path = self.root / "versions" / f"v{version:06d}.npy"
        if not path.exists():
            raise KeyError(f"version {version} is not stored")
        loaded: np.ndarray = np.load(path, allow_pickle=False)
        return loaded

    def load_momentum(self, version: int) -> np.ndarray | None:
        path = self.root / "versions" / f"m{version:06d}.npy"
        return np.load(path, allow_pickle=False) if path.exists() else None

    def load_aggregate(self, window: int) -> np.ndarray:
        loaded: np.ndarray = np.load(
            self.root / "aggregates" / f"w{window:06d}.npy", allow_pickle=False
        )
        return loaded


def stored_adapter(root: Path, version: int | None = None) -> tuple[int, np.ndarray]:
    """(version, adapter) from a coordinator's state directory; default the latest.

    Raises KeyError when nothing (or not that version) is stored.
    """
    store = CoordinatorStore(root)
    try:
        latest = store.latest_version()
        if latest is None:
            raise KeyError("the coordinator has stored no version yet")
        chosen = latest.version if version is None else version
        return chosen, store.load_adapter(chosen)
    finally:
        store.close()


def restore_state(store: CoordinatorStore, dim: int) -> CoordinatorState:
    """The core's state from the durable store; version 0 (offset zero) on a fresh start."""
    latest = store.latest_version()
    if latest is None:
        phi = np.zeros(dim, dtype=np.float32)
        store.save_version(
            VersionRecord(0, 0, vector_sha256(phi), (), 0.0, 0, b""), phi, None, None
        )
        return CoordinatorState()
    window = int(store.get_meta("window") or latest.window)
    return CoordinatorState(
        window=window,
        version=latest.version,
        phi=store.load_adapter(latest.version),
        momentum=store.load_momentum(latest.version),
        contributors=latest.contributors,
        committed=sum(1 for v in store.versions() if v.version > 0),
    )
