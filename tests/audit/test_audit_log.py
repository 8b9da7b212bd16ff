"""Lazy tree heads (when the log signs and stores them, what a crash between them leaves)
and the sender state a reopened log rebuilds from its entries."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from audit_helpers import COORDINATOR, log_signer

from echelon.audit import (
    LOG_PARTY,
    AuditRecord,
    CounterReplay,
    Direction,
    KeyRegistration,
    LogEntry,
    MemoryLogStore,
    NoAttributes,
    NoteVerifier,
    PayloadType,
    Role,
    SecAggLevels,
    SignatureError,
    SignedTreeHead,
    Signer,
    SqliteLogStore,
    StoreCorrupted,
    TransparencyLog,
    Verdict,
)
from echelon.audit.log import Registry
from echelon.audit.merkle import MerkleTree
from echelon.audit.verify import verify_log


def _signed(signer: Signer, count: int) -> list[tuple[bytes, bytes]]:
    """The signer's KEY_REGISTRATION, then STATUS records, `count` in all."""
    out = []
    for counter in range(1, count + 1):
        first = counter == 1
        data = AuditRecord(
            counter=counter,
            time_ms=counter,
            window=0,
            sender=signer.party,
            receiver=LOG_PARTY if first else COORDINATOR,
            direction=Direction.SENT,
            payload_type=PayloadType.KEY_REGISTRATION if first else PayloadType.STATUS,
            schema_version=1,
            payload_size=1,
            payload_sha256=bytes(32),
            verdict=Verdict(accepted=True),
            levels=SecAggLevels(level1=True, level2=True),
            attributes=KeyRegistration(role=Role.BOUNDARY, signing_key=signer.public_key)
            if first
            else NoAttributes(),
        ).encode()
        out.append((data, signer.sign(data)))
    return out


def _stored_sizes(db: Path) -> list[int]:
    store = SqliteLogStore(db, readonly=True)
    try:
        return [h.size for h in store.tree_heads()]
    finally:
        store.close()


def test_a_head_is_signed_every_n_appends_and_when_asked(tmp_path: Path) -> None:
    records = _signed(Signer.from_seed("org-a", b"\x07" * 32), 5)
    log = TransparencyLog(
        store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer(), checkpoint_every=4
    )

    early = [log.append(*r) for r in records[:3]]
    fourth = log.append(*records[3])
    fifth = log.append(*records[4])

    assert [r.tree_head.size for r in early] == [0, 0, 0]  # latest signed: not yet covering
    assert fourth.tree_head.size == 4 and fifth.tree_head.size == 4
    assert _stored_sizes(tmp_path / "log.db") == [4]
    asked = log.tree_head()
    assert asked.size == 5 and log.tree_head() == asked  # signed once, then reused
    assert _stored_sizes(tmp_path / "log.db") == [4, 5]
    head = NoteVerifier(log_signer().verifier_key()).verify(asked.checkpoint)
    assert head.root_hash == MerkleTree(r.leaf_hash for r in [*early, fourth, fifth]).root()
    log.close()


def test_close_signs_a_head_over_the_uncovered_tail(tmp_path: Path) -> None:
    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())
    for record in _signed(Signer.from_seed("org-a", b"\x07" * 32), 3):
        log.append(*record)
    assert _stored_sizes(tmp_path / "log.db") == []

    log.close()

    assert _stored_sizes(tmp_path / "log.db") == [3]


def test_a_log_that_crashed_between_heads_reopens_and_covers_its_tail(tmp_path: Path) -> None:
    registry = Registry()
    entries = []
    for record in _signed(Signer.from_seed("org-a", b"\x07" * 32), 3):
        accepted = registry.check(*record)
        registry.add(accepted)
        entries.append(accepted.entry)
    store = SqliteLogStore(tmp_path / "log.db")
    store.append(entries)  # what a crash after three appends and no head leaves
    store.close()

    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())

    assert log.tree_head().size == 3 and _stored_sizes(tmp_path / "log.db") == [3]
    log.close()


def test_a_stored_head_beyond_the_entries_is_refused_on_open(tmp_path: Path) -> None:
    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())
    log.append(*_signed(Signer.from_seed("org-a", b"\x07" * 32), 1)[0])
    log.close()
    db = sqlite3.connect(tmp_path / "log.db")
    db.execute("INSERT INTO tree_heads VALUES (9, zeroblob(32), x'00')")
    db.commit()
    db.close()

    with pytest.raises(StoreCorrupted):
        TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())


def test_verify_reports_an_uncovered_tail_without_a_finding(tmp_path: Path) -> None:
    log = TransparencyLog(
        store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer(), checkpoint_every=2
    )
    for record in _signed(Signer.from_seed("org-a", b"\x07" * 32), 3):
        log.append(*record)
    store = SqliteLogStore(tmp_path / "log.db", readonly=True)

    report = verify_log(
        store.get(0, 3), store.tree_heads(), verifier=NoteVerifier(log_signer().verifier_key())
    )

    assert report.uncovered == 1 and report.tree_heads == 1
    assert not [f for f in report.findings if f.check.startswith("tree_head")]
    assert "entries after the last signed tree head: 1" in report.render()
    store.close()
    log.close()


def test_checkpoint_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint_every"):
        TransparencyLog(
            store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer(), checkpoint_every=0
        )


def test_a_reopened_log_still_refuses_replays_and_knows_registered_keys(tmp_path: Path) -> None:
    signer = Signer.from_seed("org-a", b"\x07" * 32)
    records = _signed(signer, 4)
    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())
    for record in records[:3]:
        log.append(*record)
    log.close()

    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())
    for record in records[1:3]:
        with pytest.raises(CounterReplay):
            log.append(*record)
    forged = Signer.from_seed("org-a", b"\x08" * 32)  # same party, unregistered key
    with pytest.raises(SignatureError):
        log.append(records[3][0], forged.sign(records[3][0]))
    assert log.append(*records[3]).index == 3
    log.close()


class _FailingOnce(MemoryLogStore):
    """A store whose next append fails (a full disk, a lost lock) without writing."""

    fail_next = False

    def append(self, entries: Sequence[LogEntry], head: SignedTreeHead | None = None) -> int:
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        return super().append(entries, head)


def test_a_failed_store_write_leaves_the_log_as_it_was() -> None:
    records = _signed(Signer.from_seed("org-a", b"\x07" * 32), 2)
    store = _FailingOnce()
    log = TransparencyLog(store=store, signer=log_signer(), checkpoint_every=2)
    log.append(*records[0])
    store.fail_next = True
    with pytest.raises(OSError):
        log.append(*records[1])  # would also have signed a head of size 2

    assert log.size == 1 and store.tree_heads() == []
    assert log.append(*records[1]).index == 1  # its counter was not taken by the failure
    assert log.tree_head().size == 2 and [h.size for h in store.tree_heads()] == [2]


def test_an_entry_written_behind_the_logs_back_is_refused_not_misindexed(tmp_path: Path) -> None:
    records = _signed(Signer.from_seed("org-a", b"\x07" * 32), 3)
    log = TransparencyLog(store=SqliteLogStore(tmp_path / "log.db"), signer=log_signer())
    log.append(*records[0])
    other = sqlite3.connect(tmp_path / "log.db")  # a second writer the log does not know
    data, sig = records[1]
    other.execute(
        "INSERT INTO entries (idx, party, counter, record, signature, leaf_hash) "
        "VALUES (1, 'org-a', 99, ?, ?, ?)",
        (data, sig, bytes(32)),
    )
    other.commit()
    other.close()

    with pytest.raises(StoreCorrupted, match="store index of an append"):
        log.append(*records[1])
    assert log.size == 1
