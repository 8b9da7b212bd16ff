"""Audit log benchmark: append throughput against a plain SQLite floor, and full-log verify time.

Run `python benchmarks/bench_audit.py` (or `make bench`); `--quick` for a small run.
Appends are measured with fsync on (WAL, synchronous=FULL), beside a plain SQLite
insert loop of the same rows under the same pragmas, in the same run and directory.
The two alternate every `--chunk` records (or batch), so both see the same disk
while other jobs come and go. Records are signed before timing: signing is the
sender's cost, not the log's. The Ed25519 verification of the same rows is timed
alone, so the share of the log's time that no storage change can remove is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echelon.audit import (
    LOG_PARTY,
    AuditRecord,
    DeltaAttributes,
    Direction,
    KeyRegistration,
    LogSigner,
    NoAttributes,
    NoteVerifier,
    PayloadType,
    Role,
    RunConfig,
    SecAggLevels,
    Signer,
    SqliteLogStore,
    TransparencyLog,
    Verdict,
)
from echelon.audit.merkle import leaf_hash
from echelon.audit.record import leaf_data
from echelon.audit.signing import VerifyKey
from echelon.audit.verify import verify_log
from echelon.declaration import ModelIdentity, RunDeclaration

Signed = list[tuple[bytes, bytes]]


def _record(signer: Signer, i: int, **fields: object) -> tuple[bytes, bytes]:
    base: dict[str, object] = {
        "counter": signer.next_counter(), "time_ms": 1_790_000_000_000 + i, "window": i // 64,
        "direction": Direction.SENT, "schema_version": 1, "payload_size": 4096,
        "payload_sha256": hashlib.sha256(i.to_bytes(8, "big")).digest(),
        "verdict": Verdict(accepted=True), "levels": SecAggLevels(level1=True, level2=True),
        "attributes": NoAttributes(),
    }  # fmt: skip
    base.update(fields)
    data = AuditRecord(**base).encode()  # type: ignore[arg-type]
    return data, signer.sign(data)


def signed_records(count: int, boundaries: int = 3) -> Signed:
    """A realistic log of `count` records: registrations, the declared run, then crossings
    (masked deltas up, global adapters down), each logged by sender and receiver."""
    coord = Signer.from_seed("coord", b"\x01" * 32)
    orgs = [Signer.from_seed(f"org-{b}", bytes([b + 2]) * 32) for b in range(boundaries)]
    out: Signed = []
    for signer, role in [(coord, Role.COORDINATOR)] + [(o, Role.BOUNDARY) for o in orgs]:
        attrs = KeyRegistration(role=role, signing_key=signer.public_key)
        out.append(
            _record(
                signer,
                0,
                sender=signer.party,
                receiver=LOG_PARTY,
                payload_type=PayloadType.KEY_REGISTRATION,
                attributes=attrs,
            )
        )
    model = ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 1)
    config = RunDeclaration(run_id="bench", model=model).to_canonical_bytes()
    for org in orgs:
        for signer, direction in ((coord, Direction.SENT), (org, Direction.RECEIVED)):
            out.append(
                _record(
                    signer,
                    0,
                    sender="coord",
                    receiver=org.party,
                    direction=direction,
                    payload_type=PayloadType.RUN_CONFIG,
                    payload_size=len(config),
                    attributes=RunConfig(config=config),
                )
            )
    i = 0
    while len(out) < count:
        i += 1
        org = orgs[i % boundaries]
        if i % 2:
            pair = ((org, Direction.SENT), (coord, Direction.RECEIVED))
            flow = {
                "sender": org.party,
                "receiver": "coord",
                "payload_type": PayloadType.MASKED_DELTA,
                "attributes": DeltaAttributes(cohort_size=boundaries, devices=4),
            }
        else:
            pair = ((coord, Direction.SENT), (org, Direction.RECEIVED))
            flow = {
                "sender": "coord",
                "receiver": org.party,
                "payload_type": PayloadType.GLOBAL_ADAPTER,
            }
        for signer, direction in pair:
            out.append(_record(signer, i, direction=direction, **flow))
    return out[:count] if count % 2 == 0 else out[: count + 1]


def log_signer() -> LogSigner:
    return LogSigner.from_seed(name="bench-log", origin="echelon.bench/log", seed=b"\x05" * 32)


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def log_appends(log: TransparencyLog, records: Signed, batch: int) -> Callable[[], None]:
    """The log's appends of `records`: one `append` per record, or `append_many` per batch."""

    def run() -> None:
        if batch == 1:
            for data, sig in records:
                log.append(data, sig)
        else:
            for i in range(0, len(records), batch):
                log.append_many(records[i : i + batch])

    return run


def floor_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE entries (idx INTEGER PRIMARY KEY, party TEXT, counter INTEGER, "
        "record BLOB, signature BLOB, leaf_hash BLOB)"
    )
    return db


def floor_inserts(
    db: sqlite3.Connection, first: int, records: Signed, batch: int
) -> Callable[[], None]:
    """The same rows through a bare INSERT loop, same pragmas, one commit per batch."""
    rows = [
        (i, f"p{i % 4}", i, data, sig, leaf_hash(leaf_data(data, sig)))
        for i, (data, sig) in enumerate(records, first)
    ]

    def run() -> None:
        for i in range(0, len(rows), batch):
            db.execute("BEGIN")
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows[i : i + batch])
            db.execute("COMMIT")

    return run


def appends_vs_floor(root: Path, records: Signed, batch: int, chunk: int) -> tuple[float, float]:
    """Seconds of the log and of the floor over `records`, alternating every `chunk` commits."""
    log = TransparencyLog(store=SqliteLogStore(root / f"log-{batch}.db"), signer=log_signer())
    db = floor_db(root / f"floor-{batch}.db")
    ours = floor = 0.0
    step = batch * chunk
    for i in range(0, len(records), step):
        part = records[i : i + step]
        floor_run = floor_inserts(db, i, part, batch)  # rows built outside the timing
        ours += timed(log_appends(log, part, batch))
        floor += timed(floor_run)
    log.close()
    db.close()
    return ours, floor


def ed25519_verify_s(records: Signed) -> float:
    """Seconds to verify the records' signatures alone, keys already parsed, through the
    log's own `VerifyKey`: the part of an append that no storage change can remove."""
    keys: dict[str, VerifyKey] = {}
    jobs = []
    for data, sig in records:
        record = AuditRecord.decode(data)
        if isinstance(record.attributes, KeyRegistration):
            keys[record.signer] = VerifyKey(record.attributes.signing_key)
        jobs.append((keys[record.signer], sig, data))

    def run() -> None:
        for key, sig, data in jobs:
            key.verify(data, sig, what="bench")

    return timed(run)


def verify_time(path: Path, count: int) -> tuple[float, bool]:
    records = signed_records(count)
    log = TransparencyLog(store=SqliteLogStore(path), signer=log_signer())
    for i in range(0, count, 1000):
        log.append_many(records[i : i + 1000])
    verifier = NoteVerifier(log.signer.verifier_key())
    log.close()
    store = SqliteLogStore(path, readonly=True)
    result: list[bool] = []

    def run() -> None:
        report = verify_log(store.get(0, store.size()), store.tree_heads(), verifier=verifier)
        result.append(report.ok)

    seconds = timed(run)
    store.close()
    return seconds, result[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--dir", type=Path, help="where to write the databases (default: tmp)")
    parser.add_argument(
        "--chunk", type=int, default=100, help="records per log/floor turn (at least a commit)"
    )
    parser.add_argument("--appends-only", action="store_true", help="skip the verify case")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    single, batched, verify_n = (300, 5_000, 10_000) if args.quick else (2_000, 50_000, 100_000)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"audit log benchmark ({'quick' if args.quick else 'full'}), databases in {root}")
        print(f"{'case':<50}{'records':>9}{'seconds':>10}{'records/s':>12}{'vs floor':>10}")
        for label, n, batch in (("one append per commit", single, 1),
                                ("append_many, 1000 per commit", batched, 1000)):  # fmt: skip
            records = signed_records(n)
            ours, floor = appends_vs_floor(root, records, batch, max(1, args.chunk // batch))
            ed = ed25519_verify_s(records)
            print(f"{'log: ' + label:<50}{n:>9}{ours:>10.2f}{n / ours:>12.0f}{floor / ours:>10.0%}")
            print(f"{'floor: plain INSERT, ' + label:<50}{n:>9}{floor:>10.2f}{n / floor:>12.0f}")
            extra, commit = (ours - floor) / n * 1e6, floor / n * batch * 1e6
            # The log reaches 50% of the floor exactly while commit >= batch * extra.
            print(f"  log over floor: {extra:.0f}us per record; floor: {commit:.0f}us per commit")
            print(
                f"{'  Ed25519 verify of the same rows alone':<50}{n:>9}{ed:>10.2f}{n / ed:>12.0f}"
                f"{'':>10}  ({ed / ours:.0%} of the log's time, {ed / n * 1e6:.0f}us each)"
            )
            print(f"{'  bound: floor + that verify':<50}{n:>9}{floor + ed:>10.2f}"
                  f"{n / (floor + ed):>12.0f}{floor / (floor + ed):>10.0%}")  # fmt: skip
        if args.appends_only:
            return 0
        seconds, ok = verify_time(root / "verify.db", verify_n)
        print(f"{'verify whole log (' + ('PASS' if ok else 'FAIL') + ')':<50}{verify_n:>9}"
              f"{seconds:>10.2f}{verify_n / seconds:>12.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
