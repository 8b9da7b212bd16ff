"""Pipelined audit appends against a real audit log server: `AppendStream` appends in order
and names the record it refuses; `PipelinedSink` keeps its invariant (everything a party
signed before its previous egress is on the log before its next egress) and a party whose
log refuses or does not answer stops all egress."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from audit_helpers import Clock, registered_gate
from conftest import LogService
from test_audit_gate import _registration, _status

from echelon.audit import AppendResult, EgressGate, PayloadType, Policy, Role, Signer
from echelon.audit.log import PENDING
from echelon.audit.store import read_records
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from services.audit_log.client import AuditClient, RemoteAppendRefused
from services.common.audited import AuditedPeer, EgressHalted
from services.common.pipelined import PipelinedSink, PipelineFailed, StreamSink
from services.common.wire import new_ref

pytestmark = pytest.mark.timeout(30)


def _size(service: LogService) -> int:
    return len(read_records(service.data_dir / "log.db"))


def test_append_stream_appends_in_order_and_names_the_refused_record(
    service: LogService,
) -> None:
    assert service.client is not None
    signer, thief = Signer.generate("org-a"), Signer.generate("org-a")
    good = [_registration(signer, 1), _status(signer, 2), _status(signer, 3)]
    bad = _status(signer, 5)
    records = [(r, signer.sign(r)) for r in good] + [(bad, thief.sign(bad))]
    results: list[AppendResult] = []
    with pytest.raises(RemoteAppendRefused, match=r"AppendRequest\[3\]"):
        results.extend(service.client.append_stream(iter(records)))
    assert [r.index for r in results] == [0, 1, 2]  # answered in order, before the refusal
    assert _size(service) == 3

    assert service.channel is not None
    stub = audit_pb2_grpc.AuditLogStub(service.channel)
    request = audit_pb2.AppendRequest(ref=new_ref(0), record=b"{}", signature=b"short")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AppendStream(iter([request]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert info.value.details() == (  # type: ignore[attr-defined]
        "AppendRequest[0].signature: got '5 bytes', want 64 bytes"
    )


class HeldClient:
    """The real client, whose answers reach the pipeline only when the test lets each one
    through (as a slow link would hold them)."""

    def __init__(self, client: AuditClient) -> None:
        self.client = client
        self.release = threading.Semaphore(0)

    def append_stream(self, records: Iterator[tuple[bytes, bytes]]) -> Iterator[AppendResult]:
        for result in self.client.append_stream(records):
            self.release.acquire()
            yield result


def _peer(
    service: LogService, client: StreamSink, fence_timeout_s: float = 20.0
) -> tuple[PipelinedSink, AuditedPeer]:
    """A registered party whose later records go through a pipeline over `client`, wired as
    `audited_peer(..., pipelined=True)` wires it (a failed append halts the party)."""
    assert service.client is not None
    peers: list[AuditedPeer] = []
    sink = PipelinedSink(
        client, fence_timeout_s=fence_timeout_s, on_failure=lambda why: peers[0].halt(why)
    )
    gate = registered_gate("org-a", Role.BOUNDARY, Policy(), service.client, Clock())
    piped = EgressGate(
        party="org-a",
        role=Role.BOUNDARY,
        signer=gate._signer,
        policy=Policy(),
        sink=sink,
        clock=Clock(),
    )
    peers.append(AuditedPeer(piped, lambda policy: piped, sink))
    return sink, peers[0]


def _status_record(peer: AuditedPeer, window: int) -> AppendResult:
    return peer.gate.received(PayloadType.STATUS, "coordinator", window, b"s", None)


def test_egress_waits_only_for_records_signed_before_the_previous_egress(
    service: LogService,
) -> None:
    assert service.client is not None
    held = HeldClient(service.client)
    sink, peer = _peer(service, held)
    try:
        assert _status_record(peer, 1).index == PENDING  # signed now, appended later
        peer.before_egress()  # the first egress: nothing was due before it, no wait
        assert sink.pending == 1  # the log has not answered for it yet

        _status_record(peer, 2)
        egress = threading.Thread(target=peer.before_egress)
        egress.start()  # the second egress needs window 1's record on the log
        held.release.release()  # let the log's answer for that record through
        egress.join(20)
        assert not egress.is_alive()
        records = read_records(service.data_dir / "log.db")
        assert [r.window for r in records][:2] == [0, 1]
        held.release.release()  # and the rest
        assert sink.flush(20.0)
        assert [r.window for r in read_records(service.data_dir / "log.db")] == [0, 1, 2]
        assert [r.counter for r in read_records(service.data_dir / "log.db")] == [1, 2, 3]
    finally:
        for _ in range(4):
            held.release.release()
        sink.close()


def test_a_log_that_does_not_answer_halts_the_party_at_its_next_egress(
    service: LogService,
) -> None:
    assert service.client is not None
    held = HeldClient(service.client)  # never released
    sink, peer = _peer(service, held, fence_timeout_s=0.5)
    try:
        _status_record(peer, 1)
        peer.before_egress()
        with pytest.raises(EgressHalted, match="took no record"):
            peer.before_egress()
        assert peer.halted is not None
        with pytest.raises(EgressHalted):
            peer.gate.send(PayloadType.STATUS, "coordinator", 3, b"x", None, lambda: None)
    finally:
        for _ in range(4):
            held.release.release()
        sink.close(1.0)


def test_a_refused_record_halts_the_party_and_nothing_more_is_signed(
    service: LogService,
) -> None:
    assert service.client is not None
    sink, peer = _peer(service, service.client)
    try:
        # someone else's record under this party's name: the log refuses the signature
        thief = Signer.generate("org-a")
        forged = _status(thief, 50)
        sink.append(forged, thief.sign(forged))
        assert not sink.flush(10.0)
        assert peer.halted is not None and "did not take record 1" in peer.halted
        with pytest.raises(PipelineFailed):
            sink.append(forged, thief.sign(forged))
        with pytest.raises(EgressHalted):
            peer.before_egress()
    finally:
        sink.close(1.0)
