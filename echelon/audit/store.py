"""Durable, append-only storage of log entries and issued tree heads, behind `LogStore`.

Two backends share one contract (tests/audit/test_audit_store.py): `MemoryLogStore`
for tests and the simulator, `SqliteLogStore` for the service (WAL, synchronous=FULL,
triggers that abort UPDATE and DELETE, the index assigned inside the insert's
own transaction).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .checkpoint import SignedTreeHead
from .errors import LogRangeError, StoreCorrupted
from .record import AuditRecord


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """What the log appends: the signed record, its signer and counter, and its leaf hash."""

    record: bytes
    signature: bytes
    party: str
    counter: int
    leaf_hash: bytes


@dataclass(frozen=True, kw_only=True)
class StoredEntry:
    """An entry as read back, with the index the log assigned."""

    index: int
    record: bytes
    signature: bytes
    leaf_hash: bytes


class LogStore(Protocol):
    """Append-only storage of entries and the tree heads the log signed over them."""

    def append(self, entries: Sequence[LogEntry], head: SignedTreeHead | None = None) -> int:
        """Appends entries at the end, and `head` (of size size()+len(entries)) if given,
        in one transaction: all or none.

        Returns the first new index. Raises StoreCorrupted when `head.size` does not fit,
        ValueError when `entries` is empty.
        """
        ...

    def add_tree_head(self, head: SignedTreeHead) -> None:
        """Stores a head of the current size, larger than every stored head.

        Raises StoreCorrupted otherwise.
        """
        ...

    def get(self, start: int, end: int) -> list[StoredEntry]:
        """Entries with start <= index < end, in index order."""
        ...

    def size(self) -> int: ...

    def leaf_hashes(self) -> list[bytes]: ...

    def tree_heads(self) -> list[SignedTreeHead]:
        """Every tree head stored, by increasing size."""
        ...

    def close(self) -> None: ...


class MemoryLogStore:
    """An in-memory `LogStore` (thread-safe)."""

    def __init__(self) -> None:
        self._entries: list[LogEntry] = []
        self._heads: list[SignedTreeHead] = []
        self._lock = threading.Lock()

    def append(self, entries: Sequence[LogEntry], head: SignedTreeHead | None = None) -> int:
        with self._lock:
            first = len(self._entries)
            _check_entries(first, entries, head)
            self._entries.extend(entries)
            if head is not None:
                self._heads.append(head)
            return first

    def add_tree_head(self, head: SignedTreeHead) -> None:
        with self._lock:
            _check_new_head(len(self._entries), self._heads[-1].size if self._heads else -1, head)
            self._heads.append(head)

    def get(self, start: int, end: int) -> list[StoredEntry]:
        with self._lock:
            _check_range(start, end, len(self._entries))
            return [_stored(i, e) for i, e in enumerate(self._entries[start:end], start)]

    def size(self) -> int:
        with self._lock:
            return len(self._entries)

    def leaf_hashes(self) -> list[bytes]:
        with self._lock:
            return [e.leaf_hash for e in self._entries]

    def tree_heads(self) -> list[SignedTreeHead]:
        with self._lock:
            return list(self._heads)

    def close(self) -> None:
        pass


def _stored(index: int, entry: LogEntry) -> StoredEntry:
    return StoredEntry(
        index=index, record=entry.record, signature=entry.signature, leaf_hash=entry.leaf_hash
    )


def _check_entries(first: int, entries: Sequence[LogEntry], head: SignedTreeHead | None) -> None:
    if not entries:
        raise ValueError("append: got no entries, want at least one")
    if head is not None and head.size != first + len(entries):
        raise StoreCorrupted(
            "tree head size does not follow the appended entries",
            expected=first + len(entries),
            found=head.size,
        )


def _check_new_head(size: int, last: int, head: SignedTreeHead) -> None:
    if head.size != size or head.size <= last:
        raise StoreCorrupted(
            "tree head size: a new head covers the whole log and is larger than the last",
            expected=f"{size}, with {size} > {last}",
            found=head.size,
        )


def _check_range(start: int, end: int, size: int) -> None:
    if not 0 <= start <= end:
        raise LogRangeError(f"entry range: got [{start}, {end}), want 0 <= start <= end")
    if end > size:
        raise LogRangeError(f"entry range end: got {end}, want <= {size} (the log size)")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    party TEXT NOT NULL,
    counter INTEGER NOT NULL,
    record BLOB NOT NULL,
    signature BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    UNIQUE (party, counter)
);
CREATE TABLE IF NOT EXISTS tree_heads (
    tree_size INTEGER PRIMARY KEY,
    root_hash BLOB NOT NULL,
    checkpoint BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'audit log entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'audit log entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS tree_heads_no_update BEFORE UPDATE ON tree_heads
    BEGIN SELECT RAISE(ABORT, 'tree heads are append-only'); END;
CREATE TRIGGER IF NOT EXISTS tree_heads_no_delete BEFORE DELETE ON tree_heads
    BEGIN SELECT RAISE(ABORT, 'tree heads are append-only'); END;
"""

APPEND_ONLY_TRIGGERS = frozenset(
    {"entries_no_update", "entries_no_delete", "tree_heads_no_update", "tree_heads_no_delete"}
)

# The first index is read inside the transaction that inserts (BEGIN IMMEDIATE, or the
# one statement of `_INSERT_NEXT`), so no other writer can interleave; the primary key
# refuses an index taken twice.
_SIZE = "SELECT COALESCE(MAX(idx), -1) + 1 FROM entries"
_INSERT = (
    "INSERT INTO entries (idx, party, counter, record, signature, leaf_hash) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# One entry and no head: one statement that picks the index itself. Outside BEGIN it is
# its own transaction, committed (and under synchronous=FULL synced) within the one
# `execute` call; the index comes back as the row id (idx is the rowid).
_INSERT_NEXT = (
    "INSERT INTO entries (idx, party, counter, record, signature, leaf_hash) "
    f"VALUES (({_SIZE}), ?, ?, ?, ?, ?)"
)
_INSERT_HEAD = "INSERT INTO tree_heads (tree_size, root_hash, checkpoint) VALUES (?, ?, ?)"


class SqliteLogStore:
    """A `LogStore` in one SQLite file. `readonly=True` opens evidence without writing to it."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def append(self, entries: Sequence[LogEntry], head: SignedTreeHead | None = None) -> int:
        with self._lock:
            # The common case, one record per commit. Outside a transaction only: inside
            # one (a failed ROLLBACK) the insert would not commit, and BEGIN below raises.
            if len(entries) == 1 and head is None and not self._db.in_transaction:
                e = entries[0]
                cursor = self._db.execute(
                    _INSERT_NEXT, (e.party, e.counter, e.record, e.signature, e.leaf_hash)
                )
                assert cursor.lastrowid is not None  # set by every INSERT that succeeds
                return cursor.lastrowid
            self._db.execute("BEGIN IMMEDIATE")
            try:
                first = self._size_locked()
                _check_entries(first, entries, head)
                self._db.executemany(
                    _INSERT,
                    [
                        (i, e.party, e.counter, e.record, e.signature, e.leaf_hash)
                        for i, e in enumerate(entries, first)
                    ],
                )
                if head is not None:
                    self._db.execute(_INSERT_HEAD, (head.size, head.root_hash, head.checkpoint))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return first

    def add_tree_head(self, head: SignedTreeHead) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT COALESCE(MAX(tree_size), -1) FROM tree_heads")
                _check_new_head(self._size_locked(), int(row.fetchone()[0]), head)
                self._db.execute(_INSERT_HEAD, (head.size, head.root_hash, head.checkpoint))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _size_locked(self) -> int:
        return int(self._db.execute(_SIZE).fetchone()[0])

    def get(self, start: int, end: int) -> list[StoredEntry]:
        with self._lock:
            _check_range(start, end, self._size_locked())
            rows = self._db.execute(
                "SELECT idx, record, signature, leaf_hash FROM entries "
                "WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end),
            ).fetchall()
        return [
            StoredEntry(index=int(i), record=bytes(r), signature=bytes(s), leaf_hash=bytes(h))
            for i, r, s, h in rows
        ]

    def size(self) -> int:
        with self._lock:
            return self._size_locked()

    def leaf_hashes(self) -> list[bytes]:
        with self._lock:
            rows = self._db.execute("SELECT leaf_hash FROM entries ORDER BY idx").fetchall()
        return [bytes(r[0]) for r in rows]

    def tree_heads(self) -> list[SignedTreeHead]:
        with self._lock:
            rows = self._db.execute(
                "SELECT tree_size, root_hash, checkpoint FROM tree_heads ORDER BY tree_size"
            ).fetchall()
        return [
            SignedTreeHead(size=int(n), root_hash=bytes(r), checkpoint=bytes(c)) for n, r, c in rows
        ]

    def triggers(self) -> frozenset[str]:
        """Names of the triggers present (the verifier checks the append-only ones are there)."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            return frozenset(str(r[0]) for r in rows.fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_records(db: Path) -> list[AuditRecord]:
    """Every record of the SQLite log at `db`, decoded, in log order (read-only)."""
    store = SqliteLogStore(db, readonly=True)
    try:
        return [AuditRecord.decode(e.record) for e in store.get(0, store.size())]
    finally:
        store.close()
