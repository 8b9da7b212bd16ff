"""The log operator drops both records of a crossing (org-a's masked vector, as org-a sent it
and as the coordinator received it): it acknowledges each, but leaves it out of its tree.

Every append is answered with its proof (a head signed now, the record's inclusion under
it, consistency with the head the sender verified last), so the sender notices before its
next egress: org-a halts, sending nothing more (its survivor signature, its unmasking
shares), and the coordinator refuses to take the vector it could not record. Afterwards,
`echelon audit verify` names the gap in the coordinator's counters: every party's counters
are consecutive, a failed append being retried with its own counter.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

from echelon.audit import TransparencyLog
from echelon.audit.merkle import leaf_hash
from echelon.audit.record import AuditRecord, PayloadType, leaf_data
from echelon.audit.store import SqliteLogStore
from echelon_proto.audit.v1 import audit_pb2
from echelon_tools.audit import main as audit_cli
from services.audit_log import server as audit_server
from services.audit_log.servicer import AuditLogServicer, _tree_head

from .harness import TIMEOUT_S, start_run

pytestmark = pytest.mark.timeout(120)


class DroppingLog(AuditLogServicer):
    """The real servicer, except that it drops the records of org-a's masked vector."""

    dropped: ClassVar[list[AuditRecord]] = []

    def _append(
        self, request: audit_pb2.AppendRequest, what: str, caller: str | None
    ) -> audit_pb2.AppendResponse:
        record = AuditRecord.decode(bytes(request.record))
        if record.payload_type == PayloadType.MASKED_DELTA and "org-a" in (
            record.sender,
            record.receiver,
        ):
            DroppingLog.dropped.append(record)
            return audit_pb2.AppendResponse(  # acknowledged at the next index, never stored
                index=self._log.size,
                leaf_hash=leaf_hash(leaf_data(bytes(request.record), bytes(request.signature))),
                tree_head=_tree_head(self._log.tree_head()),
            )
        return super()._append(request, what, caller)

    def _prove(self, response: audit_pb2.AppendResponse, known_size: int) -> None:
        if response.index < self._log.size:
            super()._prove(response, known_size)
            return
        # The best a dropping log can do: a genuine head and consistency, without the record.
        head = self._log.tree_head()
        response.tree_head.CopyFrom(_tree_head(head))
        if known_size:
            response.consistency_proof.extend(self._log.consistency_proof(known_size, head.size))
        response.consistency_from = known_size


def test_a_dropped_crossing_halts_its_sender_and_verify_names_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(audit_server, "AuditLogServicer", DroppingLog)
    DroppingLog.dropped = []
    run = start_run(tmp_path / "run")
    try:
        run.release()
        org_a = run.sites.agents["org-a"]
        peer = run.sites.audit.peers["org-a"] if run.sites.audit else None
        assert peer is not None
        # org-a notices before its next egress: its egress halts on the missing proof.
        assert org_a.wait(lambda: peer.halted is not None, TIMEOUT_S), "org-a never noticed"
        # (how the missing record shows depends on what the log appended meanwhile: no
        # head that covers it, or an inclusion proof for another record at its index)
        halted = str(peer.halted)
        assert "tree head for record" in halted or "inclusion" in halted, halted
        assert run.sites.coordinator.wait(
            lambda: any(not o.committed or "org-a" not in o.contributors
                        for o in run.sites.coordinator.outcomes) or run.sites.coordinator.core.done,
            TIMEOUT_S * 2,
        )  # fmt: skip
    finally:
        run.sites.close()
    kinds = {(r.sender, r.receiver) for r in DroppingLog.dropped}
    assert ("org-a", "coordinator") in kinds  # org-a's record of its masked vector
    # org-a sent nothing after the record it could not prove.
    from echelon.audit.store import read_records

    records = read_records(run.root / "audit" / "log.db")
    after = [
        r
        for r in records
        if r.sender == "org-a"
        and r.payload_type in (PayloadType.SURVIVOR_SIGNATURE, PayloadType.UNMASKING_SHARES)
    ]
    assert after == []
    capsys.readouterr()
    code = audit_cli(["verify", "--db", str(run.root / "audit" / "log.db"),
                      "--manifest", str(run.root / "kits" / "auditor")])  # fmt: skip
    out = capsys.readouterr().out
    if ("org-a", "coordinator") in {(r.sender, r.receiver) for r in DroppingLog.dropped
                                    if r.signer == "coordinator"}:  # fmt: skip
        # The vector crossed before org-a's next egress check (the answer came after it):
        # the coordinator's record of receiving it was dropped too, and refused its proof;
        # its later records leave a gap that verify names.
        assert code == 1
        assert "[counter_gap]" in out and "coordinator's counter" in out, out[-2000:]
    else:
        # The answer came first: org-a halted before its vector left (nothing crossed, so
        # there is no receiver's record to miss); the log is consistent without it.
        assert not any(
            r.payload_type == PayloadType.MASKED_DELTA and r.sender == "org-a" for r in records
        )


class ForkingLog(AuditLogServicer):
    """The real servicer over two trees signed with the one log key: org-a is shown one
    (its own records), every other party the other. Each tree is consistent in itself, so
    each party's own proofs pass; only comparing heads across parties shows the fork."""

    shadow: ClassVar[Path]
    _view = threading.local()

    def __init__(self, log: TransparencyLog, *args: Any, **kwargs: Any) -> None:
        super().__init__(log, *args, **kwargs)
        manifest = self._transport.manifest
        assert manifest is not None
        self._trees = {
            "main": log,
            "org-a": TransparencyLog(
                store=SqliteLogStore(ForkingLog.shadow),
                signer=log.signer,
                pinned=manifest.audit_signers(),
            ),
        }
        self._log = _Shown(self)  # type: ignore[assignment]

    def tree(self) -> TransparencyLog:
        return self._trees[getattr(ForkingLog._view, "name", "main")]

    def _caller(self, context: grpc.ServicerContext, *, append: bool = False) -> str | None:
        party = super()._caller(context, append=append)
        ForkingLog._view.name = "org-a" if party == "org-a" else "main"
        return party


class _Shown:
    """The tree the calling party is shown."""

    def __init__(self, servicer: ForkingLog) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._servicer.tree(), name)


def test_a_log_showing_two_parties_two_trees_is_caught_while_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_server, "AuditLogServicer", ForkingLog)
    ForkingLog.shadow = tmp_path / "shadow.db"
    run = start_run(tmp_path / "run")
    try:
        run.release()
        assert run.sites.audit is not None
        peers = run.sites.audit.peers
        # Parties attach their latest verified head to their frames and check each other's:
        # the coordinator (main tree) and org-a (its own) find that neither tree extends the
        # other, and halt their egress before the window commits anything of org-a's.
        assert run.sites.coordinator.wait(
            lambda: peers["coordinator"].halted is not None or peers["org-a"].halted is not None,
            TIMEOUT_S,
        ), "no party noticed the split view"
        halted = {p: peer.halted for p, peer in peers.items() if peer.halted}
        assert any("split view" in str(reason) for reason in halted.values()), halted
        assert not any(
            "org-a" in c.contributors for c in run.sites.commits
        )  # nothing of org-a's was summed under the split view
    finally:
        run.sites.close()


class SubstitutingLog(AuditLogServicer):
    """Drops org-a's record of its masked vector and answers with the index and leaf of an
    entry already on the log, whose inclusion proof is genuine."""

    def _append(
        self, request: audit_pb2.AppendRequest, what: str, caller: str | None
    ) -> audit_pb2.AppendResponse:
        record = AuditRecord.decode(bytes(request.record))
        if record.payload_type == PayloadType.MASKED_DELTA and record.sender == "org-a":
            last = self._log.entries(self._log.size - 1, self._log.size)[0]
            return audit_pb2.AppendResponse(index=last.index, leaf_hash=last.leaf_hash)
        return super()._append(request, what, caller)


def test_an_answer_proving_another_record_halts_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_server, "AuditLogServicer", SubstitutingLog)
    run = start_run(tmp_path / "run")
    try:
        run.release()
        assert run.sites.audit is not None
        peer = run.sites.audit.peers["org-a"]
        assert run.sites.agents["org-a"].wait(lambda: peer.halted is not None, TIMEOUT_S)
        assert "the leaf hash of the record sent" in str(peer.halted), peer.halted
    finally:
        run.sites.close()
