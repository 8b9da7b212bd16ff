"""A log pinned to a manifest's parties across a rotation, and the egress gate's retry of an
append the log did not answer: counters stay consecutive, and a timed-out append that
did land is not sent twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_helpers import Clock, log_signer

from echelon.audit import (
    LOG_PARTY,
    AppendResult,
    AuditRecord,
    EgressGate,
    KeyRegistration,
    LocalSink,
    PayloadType,
    Policy,
    Role,
    Signer,
    SqliteLogStore,
    TransparencyLog,
)
from echelon.audit.errors import NotAParty
from echelon.audit.log import PinnedParty
from echelon.audit.verify import verify_log


def _gate(signer: Signer, sink: object, clock: Clock) -> EgressGate:
    return EgressGate(
        party=signer.party,
        role=Role.BOUNDARY,
        signer=signer,
        policy=Policy(),
        sink=sink,  # type: ignore[arg-type]
        clock=clock,
    )


def _register(gate: EgressGate, signer: Signer) -> None:
    attrs = KeyRegistration(role=Role.BOUNDARY, signing_key=signer.public_key)
    gate.send(PayloadType.KEY_REGISTRATION, LOG_PARTY, 0, signer.public_key, attrs, lambda: None)


def _status(gate: EgressGate, n: int) -> None:
    gate.send(PayloadType.STATUS, "coordinator", 1, bytes([n]), None, lambda: None)


def test_a_log_reopened_under_a_later_manifest_keeps_a_removed_partys_past(
    tmp_path: Path,
) -> None:
    a, c = Signer.generate("org-a"), Signer.generate("org-c")
    pins = {s.party: PinnedParty(signing_key=s.public_key, role=Role.BOUNDARY) for s in (a, c)}
    db = tmp_path / "log.db"
    clock = Clock()
    log = TransparencyLog(store=SqliteLogStore(db), signer=log_signer(), pinned=pins)
    gate_c = _gate(c, LocalSink(log), clock)
    _register(gate_c, c)
    _status(gate_c, 1)
    log.close()

    # Version 2 of the manifest removes org-c: its past records stay, its new ones are refused.
    reopened = TransparencyLog(
        store=SqliteLogStore(db), signer=log_signer(), pinned={"org-a": pins["org-a"]}
    )
    assert reopened.size == 2
    gate_a = _gate(a, LocalSink(reopened), clock)
    _register(gate_a, a)
    with pytest.raises(NotAParty, match="not a party of the run's manifest"):
        _status(_gate(c, LocalSink(reopened), clock), 2)
    reopened.close()


class FlakySink:
    """Answers the first append with a timeout after storing it (a reply lost on the way
    back), and the second with a timeout without storing it; then it works."""

    def __init__(self, log: TransparencyLog) -> None:
        self.log = log
        self.calls = 0

    def append(self, record: bytes, signature: bytes) -> AppendResult:
        self.calls += 1
        if self.calls == 2:
            result = self.log.append(record, signature)
            del result
            raise TimeoutError("the log's answer was lost")
        if self.calls == 3:
            raise ConnectionError("audit log unavailable")
        return self.log.append(record, signature)


def test_an_unanswered_append_is_retried_with_its_counter_and_none_is_sent_twice() -> None:
    log = TransparencyLog(store=SqliteLogStore(":memory:"), signer=log_signer())
    signer = Signer.generate("org-a")
    sink = FlakySink(log)
    gate = _gate(signer, sink, Clock())
    _register(gate, signer)  # call 1: appended
    with pytest.raises(TimeoutError):
        _status(gate, 1)  # call 2: stored, but the answer was lost
    with pytest.raises(ConnectionError):
        _status(gate, 2)  # call 3: the retry of record 2 fails; no new counter is used
    _status(gate, 3)  # the retry lands as a CounterReplay (it was stored): then record 3

    entries = log.entries(0, log.size)
    counters = [AuditRecord.decode(e.record).counter for e in entries]
    assert counters == [1, 2, 3]  # consecutive, nothing twice
    report = verify_log(entries, [log.tree_head()], verifier=None)
    assert not [f for f in report.findings if f.check == "counter_gap"], report.findings
    log.close()
