"""`echelon audit verify` catches each tampering of a real log written by a multi-site run.

The attacker has file access: each test copies the rows of the real log into a
fresh database (bypassing the append-only triggers, which only guard the
service's own connection) with one change, and runs the CLI on the copy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from echelon.audit import AuditRecord, NoteVerifier, Signer, SqliteLogStore, Witness
from echelon.audit.merkle import leaf_hash
from echelon.audit.record import leaf_data, replace
from echelon_tools.audit import main
from services.audit_log.client import AuditClient
from tests.services.sessions import federation_config, start_sites

Row = tuple[int, str, int, bytes, bytes, bytes]  # idx, party, counter, record, signature, leaf_hash
HeadRow = tuple[int, bytes, bytes]


@dataclass(frozen=True)
class RealLog:
    db: Path
    snapshot: Path  # a consistent copy taken after the first window
    witness: Path  # a party's witness file, holding the final tree head
    vkey: Path


CONFIG = federation_config(round_timeout_s=2.0, windows=3)


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLog]:
    """A log written by a real multi-site run: three boundary agents dialling out to the
    coordinator over gRPC window sessions, level-2 secure aggregation, three windows
    (tests/services/sessions.py). The federation stops after window 1, when nothing is in
    flight, and the snapshot is taken; then every party restarts on the same log (the
    coordinator from its durable state) and runs windows 2 and 3."""
    root = tmp_path_factory.mktemp("real")
    state = root / "coordinator" / "state"
    first = start_sites(dataclasses.replace(CONFIG, windows=1), audit=root, state=state)
    try:
        assert first.run(), "window 1 did not finish"
    finally:
        first.close()
    assert first.audit is not None
    db = first.audit.db
    vkey = db.parent / "log.vkey"
    snapshot = root / "snapshot.db"
    with sqlite3.connect(db) as src, sqlite3.connect(snapshot) as dst:
        src.backup(dst)
    sites = start_sites(CONFIG, audit=root, state=state)
    assert sites.audit is not None
    channel = grpc.insecure_channel(f"127.0.0.1:{sites.audit.server.port}")
    try:
        assert sites.run(), "windows 2 and 3 did not finish"
        assert [o.committed for o in sites.coordinator.outcomes] == [True, True]
        assert sites.coordinator.core.version == 3
        client = AuditClient(channel)
        witness = Witness(
            path=root / "witness.json", verifier=NoteVerifier(vkey.read_text()), source=client
        )
        witness.update(client.tree_head().checkpoint)
    finally:
        channel.close()
        sites.close()
    shutil.copy(vkey, root / "log.vkey")
    yield RealLog(db=db, snapshot=snapshot, witness=root / "witness.json", vkey=vkey)


def _read(db: Path) -> tuple[list[Row], list[HeadRow]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT idx, party, counter, record, signature, leaf_hash FROM entries ORDER BY idx"
        ).fetchall()
        heads = conn.execute("SELECT tree_size, root_hash, checkpoint FROM tree_heads").fetchall()
    return rows, heads


def _forge(
    real: RealLog,
    tmp_path: Path,
    rows_fn: Callable[[list[Row]], list[Row]],
    heads_fn: Callable[[list[HeadRow]], list[HeadRow]] = lambda h: h,
) -> Path:
    rows, heads = _read(real.db)
    db = tmp_path / "forged.db"
    SqliteLogStore(db).close()  # a fresh database with the schema and triggers
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows_fn(rows))
        conn.executemany("INSERT INTO tree_heads VALUES (?, ?, ?)", heads_fn(heads))
    shutil.copy(real.vkey, tmp_path / "log.vkey")
    return db


def _verify(db: Path, tmp_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    out = tmp_path / "report.json"
    status = main(["verify", "--db", str(db), "--json", str(out), *extra])
    return status, json.loads(out.read_text())


def _checks(report: dict[str, object]) -> dict[str, list[object]]:
    found: dict[str, list[object]] = {}
    for f in report["findings"]:  # type: ignore[attr-defined]
        found.setdefault(f["check"], []).append(f["index"])
    return found


def _index_of(rows: list[Row], sender: str, type_name: str) -> int:
    for row in rows:
        record = AuditRecord.decode(row[3])
        if record.signer == sender and record.payload_type.name == type_name:
            return row[0]
    raise AssertionError(f"no {type_name} from {sender}")


def test_the_untouched_log_passes(
    real_log: RealLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, report = _verify(real_log.db, tmp_path, "--witness", str(real_log.witness))
    assert status == 0, capsys.readouterr().out
    rows, _ = _read(real_log.db)
    assert report["verdict"] == "PASS" and report["size"] == len(rows) > 200
    out = capsys.readouterr().out
    assert "PASS" in out and "MASKED_DELTA" in out


def test_one_edited_byte_is_caught_at_its_index(real_log: RealLog, tmp_path: Path) -> None:
    rows, _ = _read(real_log.db)
    target = _index_of(rows, "org-a", "MASKED_DELTA")

    def edit(rows: list[Row]) -> list[Row]:
        row = rows[target]
        at = row[3].index(b'"payload_sha256":"') + len(b'"payload_sha256":"')
        flipped = b"1" if row[3][at : at + 1] != b"1" else b"2"
        rows[target] = (*row[:3], row[3][:at] + flipped + row[3][at + 1 :], *row[4:])
        return rows

    status, report = _verify(_forge(real_log, tmp_path, edit), tmp_path)
    checks = _checks(report)
    assert status == 1
    assert target in checks["signature"] and "tree_head" in checks


def test_a_deleted_record_is_caught(real_log: RealLog, tmp_path: Path) -> None:
    rows, _ = _read(real_log.db)
    target = _index_of(rows, "org-b", "MASKED_DELTA")

    def delete(rows: list[Row]) -> list[Row]:
        kept = [r for r in rows if r[0] != target]
        return [(i, *r[1:]) for i, r in enumerate(kept)]  # renumbered: no gap left

    checks = _checks(_verify(_forge(real_log, tmp_path, delete), tmp_path)[1])
    assert "tree_head" in checks and "double_entry" in checks


def test_a_gap_in_the_indexes_is_caught(real_log: RealLog, tmp_path: Path) -> None:
    db = _forge(real_log, tmp_path, lambda rows: [r for r in rows if r[0] != 5])
    assert 6 in _checks(_verify(db, tmp_path)[1])["index"]


def test_two_reordered_records_are_caught(real_log: RealLog, tmp_path: Path) -> None:
    def swap(rows: list[Row]) -> list[Row]:
        rows[10], rows[11] = (10, *rows[11][1:]), (11, *rows[10][1:])
        return rows

    checks = _checks(_verify(_forge(real_log, tmp_path, swap), tmp_path)[1])
    assert "tree_head" in checks


def test_a_truncated_tail_is_caught_by_the_stored_tree_heads(
    real_log: RealLog, tmp_path: Path
) -> None:
    db = _forge(real_log, tmp_path, lambda rows: rows[:-3])
    assert "truncation" in _checks(_verify(db, tmp_path)[1])


def test_a_truncated_tail_with_its_tree_heads_is_caught_by_a_witness(
    real_log: RealLog, tmp_path: Path
) -> None:
    rows, _ = _read(real_log.db)
    size = len(rows) - 3
    db = _forge(real_log, tmp_path, lambda r: r[:size], lambda h: [x for x in h if x[0] <= size])
    status, report = _verify(db, tmp_path, "--witness", str(real_log.witness))
    assert status == 1 and "witness" in _checks(report)


def test_a_forged_record_is_caught(real_log: RealLog, tmp_path: Path) -> None:
    forger = Signer.generate("org-a")

    def insert(rows: list[Row]) -> list[Row]:
        original = AuditRecord.decode(rows[_index_of(rows, "org-a", "MASKED_DELTA")][3])
        data = replace(original, counter=10_000, window=99).encode()
        sig = forger.sign(data)
        return [*rows, (len(rows), "org-a", 10_000, data, sig, leaf_hash(leaf_data(data, sig)))]

    rows, _ = _read(real_log.db)
    checks = _checks(_verify(_forge(real_log, tmp_path, insert), tmp_path)[1])
    assert len(rows) in checks["signature"]


def test_a_swapped_signing_key_with_re_signed_records_is_caught(
    real_log: RealLog, tmp_path: Path
) -> None:
    thief = Signer.generate("org-a")

    def resign(rows: list[Row]) -> list[Row]:
        out = []
        for idx, party, counter, data, sig, leaf in rows:
            if party == "org-a":
                record = AuditRecord.decode(data)
                attrs = record.attributes
                if record.payload_type.name == "KEY_REGISTRATION":
                    attrs = replace_key(attrs, thief.public_key)
                data = replace(record, attributes=attrs).encode()
                sig = thief.sign(data)
                leaf = leaf_hash(leaf_data(data, sig))
            out.append((idx, party, counter, data, sig, leaf))
        return out

    status, report = _verify(_forge(real_log, tmp_path, resign), tmp_path)
    checks = _checks(report)
    assert status == 1 and "signature" not in checks and "tree_head" in checks


def replace_key(attrs: object, key: bytes) -> object:
    return dataclasses.replace(attrs, signing_key=key)  # type: ignore[type-var]


def test_a_log_rolled_back_to_an_older_copy_is_caught_by_a_witness(
    real_log: RealLog, tmp_path: Path
) -> None:
    db = tmp_path / "rolled-back.db"
    shutil.copy(real_log.snapshot, db)
    shutil.copy(real_log.vkey, tmp_path / "log.vkey")
    assert _verify(db, tmp_path)[0] == 0  # consistent in itself
    status, report = _verify(db, tmp_path, "--witness", str(real_log.witness))
    assert status == 1 and "rolled back" in str(report["findings"])


def test_show_filters_by_window_boundary_and_type(
    real_log: RealLog, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "show",
        "--db",
        str(real_log.db),
        "--window",
        "1",
        "--boundary",
        "org-a",
        "--type",
        "masked_delta",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows, _ = _read(real_log.db)
    assert lines[-1] == f"2 record(s) of {len(rows)}"  # sent by org-a, received by coordinator
    assert all("MASKED_DELTA" in line for line in lines[1:-1])
    assert main(["show", "--db", str(real_log.db), "--type", "NOPE"]) == 2
