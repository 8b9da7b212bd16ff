"""One contract for every LogStore backend, SQLite's append-only triggers, a SIGKILL crash test."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_helpers import log_signer

from echelon.audit import (
    LogEntry,
    LogRangeError,
    LogStore,
    MemoryLogStore,
    SignedTreeHead,
    SqliteLogStore,
    StoreCorrupted,
    TransparencyLog,
)
from echelon.audit.merkle import MerkleTree, leaf_hash
from echelon.audit.verify import verify_log


def _entry(i: int, party: str = "org-a") -> LogEntry:
    record = f'{{"i":{i}}}'.encode()
    return LogEntry(
        record=record,
        signature=bytes([i % 256]) * 64,
        party=party,
        counter=i + 1,
        leaf_hash=leaf_hash(record),
    )


def _head(size: int) -> SignedTreeHead:
    return SignedTreeHead(size=size, root_hash=size.to_bytes(32, "big"), checkpoint=b"cp%d" % size)


class LogStoreContract:
    """Every backend must pass these; a backend's test class overrides only `make_store`."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[LogStore]:
        store = self.make_store(tmp_path)
        yield store
        store.close()

    def make_store(self, tmp_path: Path) -> LogStore:
        raise NotImplementedError

    def test_a_new_store_is_empty(self, store: LogStore) -> None:
        assert (store.size(), store.leaf_hashes(), store.tree_heads()) == (0, [], [])

    def test_append_assigns_consecutive_indexes(self, store: LogStore) -> None:
        assert store.append([_entry(0)], _head(1)) == 0
        assert store.append([_entry(1), _entry(2)], _head(3)) == 1
        assert store.size() == 3
        assert [e.index for e in store.get(0, 3)] == [0, 1, 2]
        assert [e.record for e in store.get(1, 3)] == [_entry(1).record, _entry(2).record]

    def test_leaf_hashes_and_tree_heads_come_back_in_order(self, store: LogStore) -> None:
        store.append([_entry(0)], _head(1))
        store.append([_entry(1)], _head(2))
        assert store.leaf_hashes() == [_entry(0).leaf_hash, _entry(1).leaf_hash]
        assert [h.size for h in store.tree_heads()] == [1, 2]
        assert store.tree_heads()[1] == _head(2)

    def test_a_tree_head_that_does_not_follow_is_refused_and_nothing_is_written(
        self, store: LogStore
    ) -> None:
        store.append([_entry(0)], _head(1))
        with pytest.raises(StoreCorrupted):
            store.append([_entry(1), _entry(2)], _head(2))
        assert store.size() == 1 and len(store.tree_heads()) == 1

    def test_reading_past_the_end_is_a_range_error(self, store: LogStore) -> None:
        store.append([_entry(0)], _head(1))
        with pytest.raises(LogRangeError):
            store.get(0, 2)
        with pytest.raises(LogRangeError):
            store.get(1, 0)
        assert store.get(1, 1) == []

    def test_empty_appends_are_refused(self, store: LogStore) -> None:
        with pytest.raises(ValueError):
            store.append([], _head(0))

    def test_entries_append_without_a_head_and_a_head_is_added_later(self, store: LogStore) -> None:
        assert store.append([_entry(0)]) == 0
        assert store.append([_entry(1), _entry(2)]) == 1
        assert store.tree_heads() == []
        store.add_tree_head(_head(3))
        assert store.size() == 3 and store.tree_heads() == [_head(3)]

    def test_single_appends_without_a_head_take_consecutive_indexes(self, store: LogStore) -> None:
        assert [store.append([_entry(i)]) for i in range(3)] == [0, 1, 2]
        assert [e.record for e in store.get(0, 3)] == [_entry(i).record for i in range(3)]
        assert store.tree_heads() == []

    def test_an_added_head_must_cover_the_whole_log_and_grow(self, store: LogStore) -> None:
        store.append([_entry(0), _entry(1)], _head(2))
        with pytest.raises(StoreCorrupted):
            store.add_tree_head(_head(2))  # not larger than the last stored head
        with pytest.raises(StoreCorrupted):
            store.add_tree_head(_head(1))  # not the whole log
        store.append([_entry(2)])
        with pytest.raises(StoreCorrupted):
            store.add_tree_head(_head(4))  # beyond the log
        assert store.tree_heads() == [_head(2)]


class TestMemoryLogStore(LogStoreContract):
    def make_store(self, tmp_path: Path) -> LogStore:
        return MemoryLogStore()


class TestSqliteLogStore(LogStoreContract):
    def make_store(self, tmp_path: Path) -> LogStore:
        return SqliteLogStore(tmp_path / "log.db")


def test_sqlite_refuses_a_duplicate_party_counter_atomically(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "log.db")
    store.append([_entry(0)], _head(1))
    with pytest.raises(sqlite3.IntegrityError):
        store.append([_entry(1), _entry(0)], _head(3))
    assert store.size() == 1 and len(store.tree_heads()) == 1
    store.close()


def test_sqlite_refuses_a_duplicate_party_counter_in_a_single_append(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "log.db")
    store.append([_entry(0)])
    with pytest.raises(sqlite3.IntegrityError):
        store.append([_entry(0)])
    assert store.append([_entry(1)]) == 1  # the refused statement left no transaction open
    assert store.size() == 2
    store.close()


def test_sqlite_single_append_is_committed_when_it_returns(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "log.db")
    other = sqlite3.connect(tmp_path / "log.db")  # sees committed rows only
    for i in range(3):
        store.append([_entry(i)])
        assert other.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == i + 1
    other.close()
    store.close()


def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    store = SqliteLogStore(tmp_path / "log.db")
    store.append([_entry(0), _entry(1)], _head(2))
    store.close()
    reopened = SqliteLogStore(tmp_path / "log.db")
    assert reopened.size() == 2 and reopened.tree_heads() == [_head(2)]
    reopened.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE entries SET record = x'00' WHERE idx = 0",
        "DELETE FROM entries WHERE idx = 0",
        "UPDATE tree_heads SET root_hash = x'00'",
        "DELETE FROM tree_heads",
    ],
)
def test_sqlite_triggers_refuse_update_and_delete(tmp_path: Path, statement: str) -> None:
    store = SqliteLogStore(tmp_path / "log.db")
    store.append([_entry(0)], _head(1))
    store.close()
    db = sqlite3.connect(tmp_path / "log.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute(statement)
    db.close()
    assert SqliteLogStore(tmp_path / "log.db").size() == 1


def test_a_log_killed_mid_append_reopens_whole_and_verifies(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("crash_writer.py")), str(db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = -1
    for line in child.stdout:
        acknowledged = int(line)
        if acknowledged >= 150:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    log = TransparencyLog(store=SqliteLogStore(db), signer=log_signer())  # raises if torn
    assert log.size > acknowledged
    store = SqliteLogStore(db, readonly=True)
    entries = store.get(0, store.size())
    assert MerkleTree(e.leaf_hash for e in entries).root() == log.tree_head().root_hash
    assert store.tree_heads()[-1].size == len(entries)  # reopening covered any uncovered tail
    report = verify_log(entries, store.tree_heads(), verifier=None)
    structural = {
        "index",
        "leaf_hash",
        "decode",
        "signature",
        "registration",
        "counter",
        "tree_head",
        "truncation",
    }  # the writer declares no run, so policy is moot
    torn = [f for f in report.findings if f.check in structural]
    assert torn == [], report.render()
    store.close()
    log.close()
