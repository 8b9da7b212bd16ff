"""The audit log service over a real gRPC server on an ephemeral port, with the real client."""

from __future__ import annotations

import shutil
import threading
from concurrent import futures

import grpc
import pytest
from audit_helpers import COORDINATOR, Clock, registered_gate, run_exchange
from conftest import LogService
from test_audit_gate import _registration, _status

from echelon.audit import (
    AppendRefused,
    ForkError,
    LogRangeError,
    NoteVerifier,
    PayloadType,
    Policy,
    Role,
    RollbackError,
    Signer,
    Witness,
)
from echelon.audit.merkle import verify_consistency, verify_inclusion
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from services.audit_log import servicer
from services.audit_log.client import AuditClient, InvalidRecord
from services.common.wire import new_ref


def _stub(service: LogService) -> audit_pb2_grpc.AuditLogStub:
    assert service.channel is not None
    return audit_pb2_grpc.AuditLogStub(service.channel)


def _append(service: LogService, record: bytes, signature: bytes) -> audit_pb2.AppendResponse:
    request = audit_pb2.AppendRequest(ref=new_ref(0), record=record, signature=signature)
    return _stub(service).Append(request, timeout=10)


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_signed_records_append_and_their_proofs_verify(service: LogService) -> None:
    client = service.client
    assert client is not None
    run_exchange(client, windows=1)
    head = client.tree_head()
    assert head.size == 23
    verifier = NoteVerifier(service.data_dir.joinpath("log.vkey").read_text())
    assert verifier.verify(head.checkpoint).root_hash == head.root_hash
    entries = list(client.entries(0, head.size))
    assert [e.index for e in entries] == list(range(23))
    for entry in entries[::5]:
        proof = client.inclusion_proof(entry.index, head.size)
        verify_inclusion(entry.index, head.size, entry.leaf_hash, proof, head.root_hash)
    earlier = verifier.verify(client.tree_head().checkpoint)
    proof = client.consistency_proof(7, head.size)
    assert earlier.size == head.size
    root7 = _root_at(service, 7)
    verify_consistency(7, head.size, root7, head.root_hash, proof)


def test_append_answers_the_latest_signed_head_and_get_tree_head_covers_the_record(
    service: LogService,
) -> None:
    client, signer = service.client, Signer.generate("org-a")
    assert client is not None
    registration, status = _registration(signer, 1), _status(signer, 2)
    client.append(registration, signer.sign(registration))
    first_head = client.tree_head()

    result = client.append(status, signer.sign(status))
    head = client.tree_head()

    assert result.index == 1 and result.tree_head == first_head  # signed lazily: size 1
    assert head.size == 2
    proof = client.inclusion_proof(result.index, head.size)
    verify_inclusion(result.index, head.size, result.leaf_hash, proof, head.root_hash)


def _root_at(service: LogService, size: int) -> bytes:
    assert service.server is not None and service.server.log is not None
    return service.server.log._tree.root(size)


def test_a_bad_signature_is_permission_denied(service: LogService) -> None:
    signer, thief = Signer.generate("org-a"), Signer.generate("org-a")
    reg = _registration(signer, 1)
    _append(service, reg, signer.sign(reg))
    data = _status(signer, 2)
    code, detail = _code(lambda: _append(service, data, thief.sign(data)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "signature" in detail
    assert service.client is not None
    with pytest.raises(AppendRefused, match="signature"):
        service.client.append(data, thief.sign(data))


def test_a_replayed_counter_is_already_exists(service: LogService) -> None:
    signer = Signer.generate("org-a")
    reg = _registration(signer, 1)
    _append(service, reg, signer.sign(reg))
    data = _status(signer, 1, window=4)
    code, detail = _code(lambda: _append(service, data, signer.sign(data)))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "counter 1" in detail


def test_a_malformed_record_is_invalid_argument_naming_the_field(service: LogService) -> None:
    signer = Signer.generate("org-a")
    data = _registration(signer, 1).replace(b'"window":0', b'"window":-1')
    code, detail = _code(lambda: _append(service, data, signer.sign(data)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert detail.startswith("AppendRequest.record.window: got -1, want"), detail
    code, detail = _code(lambda: _append(service, b"{}", b"short"))
    assert (code, detail) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "AppendRequest.signature: got '5 bytes', want 64 bytes",
    )
    assert service.client is not None
    with pytest.raises(InvalidRecord):
        service.client.append(data, signer.sign(data))


def test_requests_without_a_ref_or_with_a_replayed_nonce_are_refused(service: LogService) -> None:
    stub = _stub(service)
    code, detail = _code(lambda: stub.GetTreeHead(audit_pb2.GetTreeHeadRequest(), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GetTreeHeadRequest.ref" in detail
    request = audit_pb2.GetTreeHeadRequest(ref=new_ref(0))
    stub.GetTreeHead(request, timeout=5)
    assert _code(lambda: stub.GetTreeHead(request, timeout=5))[0] == grpc.StatusCode.ALREADY_EXISTS


def test_proofs_and_entries_outside_the_log_are_out_of_range(service: LogService) -> None:
    client = service.client
    assert client is not None
    for call in (
        lambda: client.inclusion_proof(0, 1),
        lambda: client.consistency_proof(0, 5),
        lambda: list(client.entries(3, 4)),
    ):
        with pytest.raises(LogRangeError):
            call()


def test_get_entries_serves_at_most_one_page_per_call(
    service: LogService, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service.client is not None
    run_exchange(service.client, windows=1)
    monkeypatch.setattr(servicer, "MAX_ENTRIES_PER_CALL", 4)
    page = list(
        _stub(service).GetEntries(
            audit_pb2.GetEntriesRequest(ref=new_ref(0), start=2, end=20), timeout=5
        )
    )
    assert [e.index for e in page] == [2, 3, 4, 5]
    assert [e.index for e in service.client.entries(2, 20)] == list(range(2, 20))


def test_a_restart_resumes_the_same_log(service: LogService) -> None:
    assert service.client is not None
    gates = run_exchange(service, windows=1)
    before = service.client.tree_head()
    client = service.start()
    assert client.tree_head() == before
    gates["org-a"].send(PayloadType.STATUS, COORDINATOR, 2, b"ok", None, lambda: None)
    assert client.tree_head().size == before.size + 1


class _StuckLog(audit_pb2_grpc.AuditLogServicer):
    """Answers GetTreeHead only once the test lets it: the client's deadline passes first."""

    def __init__(self) -> None:
        self.answer = threading.Event()

    def GetTreeHead(
        self, request: audit_pb2.GetTreeHeadRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetTreeHeadResponse:
        self.answer.wait()
        return audit_pb2.GetTreeHeadResponse()


@pytest.mark.timeout(30)
def test_client_maps_an_unreachable_log_and_a_deadline_to_builtin_errors() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ConnectionError):
        AuditClient(channel, timeout_s=2).tree_head()
    stuck = _StuckLog()
    slow = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    audit_pb2_grpc.add_AuditLogServicer_to_server(stuck, slow)
    port = slow.add_insecure_port("127.0.0.1:0")
    slow.start()
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(TimeoutError),
        ):
            AuditClient(channel, timeout_s=0.2).tree_head()
    finally:
        stuck.answer.set()
        slow.stop(0)


def _witnessed_history(service: LogService, tmp_path: object) -> tuple[Witness, LogService]:
    """A witness that saw size 10+ on the live log, and a second service on an older copy."""
    assert service.client is not None
    clock = Clock()
    gate = registered_gate("org-a", Role.BOUNDARY, Policy(), service, clock)
    for _ in range(4):
        gate.send(PayloadType.STATUS, COORDINATOR, 1, b"s", None, lambda: None)
    old_dir = service.data_dir.with_name("audit-old")
    service.stop()
    shutil.copytree(service.data_dir, old_dir)
    client = service.start()
    witness_path = service.data_dir.with_name("witness.json")
    verifier = NoteVerifier(
        (service.data_dir / "log.vkey").read_text(), origin="echelon.test/audit"
    )
    witness = Witness(path=witness_path, verifier=verifier, source=service)
    witness.update(client.tree_head().checkpoint)
    for _ in range(5):
        gate.send(PayloadType.STATUS, COORDINATOR, 2, b"t", None, lambda: None)
    assert witness.update(client.tree_head().checkpoint).size == 10
    old = LogService(old_dir)
    old.start()
    return witness, old


def test_witness_catches_a_log_rolled_back_to_an_older_copy(service: LogService) -> None:
    witness, old = _witnessed_history(service, None)
    try:
        assert old.client is not None
        with pytest.raises(RollbackError) as info:
            witness.update(old.client.tree_head().checkpoint)
        assert (info.value.expected, info.value.found) == (">= 10", 5)
        assert witness.latest is not None and witness.latest.size == 10
    finally:
        old.stop()


def test_witness_catches_a_forked_log(service: LogService) -> None:
    witness, old = _witnessed_history(service, None)
    try:
        assert old.client is not None
        fork = registered_gate("org-b", Role.BOUNDARY, Policy(), old, Clock())
        for _ in range(6):
            fork.send(PayloadType.STATUS, COORDINATOR, 2, b"f", None, lambda: None)
        witness._source = old  # the parties now talk to the forked log
        with pytest.raises(ForkError):
            witness.update(old.client.tree_head().checkpoint)
        reloaded = Witness(path=witness._path, verifier=witness._verifier, source=old)
        assert reloaded.latest == witness.latest
    finally:
        old.stop()
