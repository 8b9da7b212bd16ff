"""Deterministic replay: rebuild global version N from the coordinator's stored window
aggregates and the run's declared outer optimizer, and check it against the audit log.

Each version is `OuterOptimizer.step` applied to the previous one with the window's
pseudo-gradient `sum w_b delta_b / sum w_b` (the stored aggregate also holds the cohort's
masked statistics, split off as the coordinator's core does); the same code and float32
arithmetic give the same bytes, so the rebuilt adapter's SHA-256 must equal the digest
that sender and receivers recorded on the audit log when the version was distributed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from echelon.aggregation import WindowSum
from echelon.audit.record import AuditRecord, PayloadType, RunConfig
from echelon.audit.store import read_records
from echelon.declaration import DeclarationError, RunDeclaration
from echelon.outer import OuterOptimizer
from echelon.protocol import ProtocolConfig
from echelon.protocol.stats import split_sum
from services.common.wire import vector_sha256

from .store import CoordinatorStore


class ReplayMismatch(Exception):
    """A rebuilt version differs from what was stored or recorded; names which and how."""


@dataclass(frozen=True)
class ReplayedVersion:
    version: int
    window: int
    sha256: bytes
    audited_by: int  # audit records (sent and received) that carry this digest


def _declared(records: list[AuditRecord]) -> ProtocolConfig:
    """The protocol the run declared: its outer optimizer and its masked statistics."""
    for record in records:
        if isinstance(record.attributes, RunConfig):
            try:
                return RunDeclaration.from_canonical_bytes(record.attributes.config).protocol()
            except (DeclarationError, ValueError) as exc:
                raise ReplayMismatch(f"the RUN_CONFIG record does not parse: {exc}") from exc
    raise ReplayMismatch("the audit log holds no RUN_CONFIG record to replay against")


def replay(
    coordinator_state: Path, audit_db: Path, upto: int | None = None
) -> list[ReplayedVersion]:
    """Rebuilds versions 1..upto (default: all); raises ReplayMismatch on any difference."""
    records = read_records(audit_db)
    store = CoordinatorStore(coordinator_state)
    try:
        versions = store.versions()
        if not versions:
            raise ReplayMismatch("the coordinator stored no version")
        declared = _declared(records)
        phi = store.load_adapter(0)
        optimizer = OuterOptimizer(declared.outer, phi.size)
        done: list[ReplayedVersion] = []
        for info in versions[1:]:
            if upto is not None and info.version > upto:
                break
            aggregate = store.load_aggregate(info.window)
            if vector_sha256(aggregate) != info.aggregate_sha256:
                raise ReplayMismatch(
                    f"window {info.window}: stored aggregate does not match its recorded digest"
                )
            # the aggregate is `sum w x` (the delta, then the masked statistics) and `sum w`
            weight_sum = float(aggregate[-1])
            delta_sum, _ = split_sum(
                aggregate[:-1], weight_sum, declared.stats, declared.secagg.clip
            )
            total = WindowSum(delta_sum, weight_sum, ())
            phi = optimizer.step(phi, total.pseudo_gradient())
            digest = vector_sha256(phi)
            if digest != info.sha256:
                raise ReplayMismatch(
                    f"version {info.version}: rebuilt {digest.hex()[:16]}..., "
                    f"stored {info.sha256.hex()[:16]}..."
                )
            audited = [
                r
                for r in records
                if r.payload_type == PayloadType.GLOBAL_ADAPTER
                and r.window == info.window
                and r.payload_sha256 == digest
            ]
            if not audited:
                raise ReplayMismatch(
                    f"version {info.version}: no GLOBAL_ADAPTER record of window "
                    f"{info.window} carries digest {digest.hex()[:16]}..."
                )
            done.append(ReplayedVersion(info.version, info.window, digest, len(audited)))
        return done
    finally:
        store.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echelon replay", description=__doc__)
    parser.add_argument("--coordinator-state", type=Path, required=True)
    parser.add_argument("--audit-db", type=Path, required=True)
    parser.add_argument("--version", type=int, help="replay up to this version (default: all)")
    args = parser.parse_args(argv)
    try:
        done = replay(args.coordinator_state, args.audit_db, args.version)
    except ReplayMismatch as exc:
        print(f"replay FAILED: {exc}")
        return 1
    for v in done:
        print(
            f"version {v.version:>3} (window {v.window:>3}): sha256 {v.sha256.hex()} "
            f"matches {v.audited_by} audit records"
        )
    print(f"replay OK: {len(done)} versions rebuilt bit for bit")
    return 0
