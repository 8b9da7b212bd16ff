"""Child process of the crash test: appends signed records to a SQLite log until killed.

Usage: python crash_writer.py DB_PATH. Prints each acknowledged index on its own line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from audit_helpers import log_signer

from echelon.audit import (
    LOG_PARTY,
    AuditRecord,
    Direction,
    KeyRegistration,
    NoAttributes,
    PayloadType,
    Role,
    SecAggLevels,
    Signer,
    SqliteLogStore,
    TransparencyLog,
    Verdict,
)
from echelon.audit.record import replace


def main(db: str) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    log = TransparencyLog(store=SqliteLogStore(db), signer=log_signer())
    signer = Signer.from_seed("org-a", b"\x07" * 32)
    index = 0
    while True:
        counter = signer.next_counter()
        first = counter == 1
        record = AuditRecord(
            counter=counter,
            time_ms=1_790_000_000_000 + counter,
            window=counter // 10,
            sender="org-a",
            receiver=LOG_PARTY if first else "coord",
            direction=Direction.SENT,
            payload_type=PayloadType.KEY_REGISTRATION if first else PayloadType.STATUS,
            schema_version=1,
            payload_size=counter,
            payload_sha256=counter.to_bytes(32, "big"),
            verdict=Verdict(accepted=True),
            levels=SecAggLevels(level1=True, level2=True),
            attributes=KeyRegistration(role=Role.BOUNDARY, signing_key=signer.public_key)
            if first
            else NoAttributes(),
        )
        data = record.encode()
        if counter % 3 == 0:  # batches too, so a kill can land inside a multi-row transaction
            results = log.append_many(
                [(data, signer.sign(data))]
                + [(d, signer.sign(d)) for d in [_next(signer, record) for _ in range(4)]]
            )
            index = results[-1].index
        else:
            index = log.append(data, signer.sign(data)).index
        print(index, flush=True)


def _next(signer: Signer, template: AuditRecord) -> bytes:
    return replace(
        template,
        counter=signer.next_counter(),
        payload_type=PayloadType.STATUS,
        receiver="coord",
        attributes=NoAttributes(),
    ).encode()


if __name__ == "__main__":
    main(sys.argv[1])
