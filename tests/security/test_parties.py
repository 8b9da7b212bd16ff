"""Attacks by and on the other parties, over real gRPC with mTLS (tests/security/harness.py):
an outsider acting as the coordinator towards a boundary, a lying coordinator declaring a
run other than the manifest's, a party appending records as another, a party that is no
appender, an unauthenticated download of the global adapter (and an auditor's, which is
audited), and a log its operator fabricated under keys of its own."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from echelon.audit import LogSigner, TransparencyLog
from echelon.audit.record import Direction, PayloadType
from echelon.audit.signing import Signer
from echelon.audit.store import SqliteLogStore
from echelon.declaration import SecureAggregationConfig
from echelon.trust.kit import load_kit
from echelon.trust.manifest import PartyRole
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from echelon_tools.audit import main as audit_cli
from services.boundary_agent.__main__ import accept_declaration
from services.boundary_agent.session import AgentSession, Backoff, Hello, session_trust
from services.common.server import ServerConfig, start_server
from services.common.settings import ServiceConfig
from services.common.transport import Transport, TransportError, load_transport
from services.common.wire import new_ref, vector_sha256
from tests.protocol.harness import DIM
from tests.services.sessions import BASE, LAYOUT, MODEL, TOKENIZER, declaration
from tests.trust.conftest import make_federation

from .harness import (
    CONFIG,
    TIMEOUT_S,
    Run,
    attempt_session,
    hello_frame,
    kit_channel,
    refused,
    start_run,
)

pytestmark = pytest.mark.timeout(120)


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator of the attacker's: it keeps every frame an agent sends it and answers
    a Hello with the Welcome it was given (or nothing)."""

    def __init__(self, welcome: pb.Welcome | None = None) -> None:
        self.welcome = welcome
        self.frames: list[pb.AgentFrame] = []
        self.sessions = 0
        self.said_hello = threading.Event()

    def Session(
        self, request_iterator: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorFrame]:
        self.sessions += 1
        for frame in request_iterator:
            self.frames.append(frame)
            if frame.WhichOneof("body") == "hello":
                self.said_hello.set()
                if self.welcome is not None:
                    yield pb.CoordinatorFrame(context=pb.FrameContext(), welcome=self.welcome)


def _serve(servicer: FakeCoordinator, transport: Transport) -> tuple[grpc.Server, str]:
    running = start_server(
        ServerConfig(),
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        ["echelon.coordinator.v1.Coordinator"],
        credentials=transport.server_credentials(),
    )
    return running.server, f"127.0.0.1:{running.port}"


def _agent(run: Run, address: str) -> AgentSession:
    """org-a's agent session as its main makes it, dialing `address`."""
    transport = Transport(run.kit("org-a"))
    kit = transport.kit
    assert kit is not None
    manifest = kit.manifest

    def core(welcome: pb.Welcome) -> object:
        accept_declaration(bytes(welcome.run_config), MODEL, "org-a", manifest)
        raise AssertionError("a declaration other than the manifest's was accepted")

    return AgentSession(
        core,  # type: ignore[arg-type]
        address=address,
        hello=Hello(
            boundary="org-a",
            identity_key=kit.identity_key.public_key().public_bytes_raw(),
            devices=2,
            dim=DIM,
            layout_digest=LAYOUT,
            base_model_digest=BASE,
            tokenizer_digest=TOKENIZER,
        ),
        run_id=manifest.run_id,
        train=lambda command: None,  # type: ignore[arg-type,return-value]
        backoff=Backoff(first_s=0.05, max_s=0.2),
        audit=None if run.sites.audit is None else run.sites.audit.peers["org-a"],
        **session_trust(transport, "org-a"),
    )


@pytest.mark.parametrize("impostor", ["another root's coordinator", "org-b, a manifest party"])
def test_an_outsider_acting_as_coordinator_never_completes_a_handshake(
    impostor: str, run: Run, tmp_path: Path, baseline: list[str]
) -> None:
    if impostor == "org-b, a manifest party":
        transport = Transport(run.kit("org-b"))  # a valid certificate, not the coordinator's
    else:
        other = make_federation(tmp_path / "other", run_id=CONFIG.run_id)
        transport = Transport(other.kit("coordinator"))
    fake = FakeCoordinator(pb.Welcome(run_id=CONFIG.run_id))
    server, address = _serve(fake, transport)
    try:
        # The channel the agent dials the coordinator with never gets ready: the impostor's
        # certificate is not the manifest's coordinator's, so TLS fails before any frame.
        channel = Transport(run.kit("org-a")).dial(address, PartyRole.COORDINATOR)
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3.0)
        channel.close()
        agent = _agent(run, address)
        agent.start()
        try:
            assert not fake.said_hello.wait(2.0)
        finally:
            agent.stop()
        assert fake.sessions == 0 and fake.frames == []  # nothing: no Hello, no key
        assert agent.status().connected is False
    finally:
        server.stop(0)
    assert run.finish() == baseline


def test_a_lying_coordinator_declaring_another_run_is_refused_and_audited(
    run: Run, baseline: list[str]
) -> None:
    """The coordinator's own kit (its operator lies): a Welcome whose run is weaker than
    the manifest's (level 2 off, k_min 1). The agent refuses the run before it sends a
    key, a share, a vector or a statistic, and says why on the audit log."""
    manifest = run.kit("coordinator").manifest
    weaker = dataclasses.replace(
        declaration(CONFIG),
        secagg=SecureAggregationConfig(level2=False, k_min=1, clip=CONFIG.secagg.clip),
    )
    body = weaker.to_canonical_bytes()
    assert body != manifest.declaration.to_canonical_bytes()
    import hashlib

    fake = FakeCoordinator(
        pb.Welcome(
            run_id=CONFIG.run_id,
            run_config=body,
            run_config_sha256=hashlib.sha256(body).digest(),
        )
    )
    server, address = _serve(fake, Transport(run.kit("coordinator")))
    agent = _agent(run, address)
    try:
        agent.start()
        assert agent.wait(lambda: agent.log.refused is not None, TIMEOUT_S)
    finally:
        agent.stop()
        server.stop(0)
    assert agent.log.refused is not None
    assert "other than the manifest's" in agent.log.refused
    # What the lying coordinator got: one Hello (public, O(1)); no key, share or vector.
    assert [f.WhichOneof("body") for f in fake.frames] == ["hello"]
    refusals = [r for r in run.refusals() if r.payload_type == PayloadType.RUN_CONFIG]
    assert len(refusals) == 1 and refusals[0].sender == "coordinator"
    assert refusals[0].receiver == "org-a"
    assert "run refused" in refusals[0].verdict.reason
    assert run.finish() == baseline


def test_a_party_cannot_append_as_another_or_without_being_an_appender(run: Run) -> None:
    digest = run.finish()
    assert digest
    records = run.records()
    entry = next(r for r in records if r.sender == "org-a")
    assert entry
    store = SqliteLogStore(run.root / "audit" / "log.db", readonly=True)
    try:
        stored = next(e for e in store.get(0, store.size()) if b'"org-a"' in e.record)
    finally:
        store.close()
    request = audit_pb2.AppendRequest(
        ref=new_ref(0), record=stored.record, signature=stored.signature
    )
    # org-b replays one of org-a's records: a party appends only its own.
    with kit_channel(run.audit_address, run.kit("org-b"), "audit-log") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        code, detail = refused(lambda: stub.Append(request, timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "appended by 'org-b'" in detail
    # The auditor reads the log but appends nothing.
    with kit_channel(run.audit_address, run.kit("auditor"), "audit-log") as channel:
        stub = audit_pb2_grpc.AuditLogStub(channel)
        code, detail = refused(lambda: stub.Append(request, timeout=TIMEOUT_S))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "role auditor" in detail
        head = stub.GetTreeHead(audit_pb2.GetTreeHeadRequest(ref=new_ref(0)), timeout=5)
        assert head.tree_head.tree_size >= len(records)  # the auditor reads heads


def _fetch(channel: grpc.Channel) -> tuple[int, bytes]:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    parts = list(stub.FetchGlobal(coordinator_pb2.FetchGlobalRequest(ref=new_ref(0)), timeout=10))
    header = parts[0].header
    data = b"".join(p.chunk.data for p in parts[1:])
    return int(header.version), data


def test_an_unauthenticated_download_is_refused_and_an_auditors_is_audited(
    run: Run, baseline: list[str]
) -> None:
    assert run.finish() == baseline
    from .harness import ca_only_channel

    for channel in (
        grpc.insecure_channel(run.address),
        ca_only_channel(run.address, run.kit("org-a")),
    ):
        code, _ = refused(lambda channel=channel: _fetch(channel))
        assert code == grpc.StatusCode.UNAVAILABLE
        channel.close()
    with kit_channel(run.address, run.kit("auditor")) as channel:
        version, data = _fetch(channel)
    phi = np.frombuffer(data, dtype="<f4")
    assert version == 1 and vector_sha256(phi) == dict(run.sites.coordinator.versions)[1]
    downloads = [
        r
        for r in run.records()
        if r.payload_type == PayloadType.GLOBAL_ADAPTER and r.receiver == "auditor"
    ]
    assert len(downloads) == 1 and downloads[0].direction == Direction.SENT
    kits = run.root / "kits"
    assert audit_cli(["verify", "--db", str(run.root / "audit" / "log.db"),
                      "--manifest", str(kits / "auditor")]) == 0  # fmt: skip


def test_a_log_fabricated_under_the_operators_own_keys_is_refused_with_the_manifests(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log operator rewrites the whole log, signing every party's records with keys of
    its own and the tree heads with a new log key: self-consistent, so a verifier that
    trusts the keys in the log passes it; with the manifest's keys it is refused."""
    run.finish()
    db = run.root / "audit" / "log.db"
    source = SqliteLogStore(db, readonly=True)
    entries = source.get(0, source.size())
    source.close()
    fake_db = tmp_path / "fabricated" / "log.db"
    fake_db.parent.mkdir()
    log_signer = LogSigner.from_seed(
        name="audit-log", origin="echelon.test/sites", seed=b"\x07" * 32
    )
    forged = TransparencyLog(store=SqliteLogStore(fake_db), signer=log_signer)
    signers: dict[str, Signer] = {}
    from echelon.audit.record import AuditRecord, KeyRegistration

    for stored in entries:
        record = AuditRecord.decode(stored.record)
        signer = signers.setdefault(record.signer, Signer.generate(record.signer))
        attrs = record.attributes
        if isinstance(attrs, KeyRegistration) and record.receiver == "audit-log":
            attrs = dataclasses.replace(attrs, signing_key=signer.public_key)
            record = dataclasses.replace(record, attributes=attrs)
        data = record.encode()
        forged.append(data, signer.sign(data))
    forged.close()
    (fake_db.parent / "log.vkey").write_text(log_signer.verifier_key() + "\n")

    assert audit_cli(["verify", "--db", str(fake_db)]) == 0  # keys from the log itself
    capsys.readouterr()
    assert audit_cli(["verify", "--db", str(fake_db),
                      "--manifest", str(run.root / "kits" / "auditor")]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "[manifest]" in out and "registers a key or role the manifest does not name" in out
    assert "[tree_head_signature]" in out
    assert "FAIL" in out.splitlines()[-1]
    # The genuine log passes with the same manifest.
    assert audit_cli(["verify", "--db", str(db),
                      "--manifest", str(run.root / "kits" / "auditor")]) == 0  # fmt: skip


def test_a_revoked_party_is_refused_after_a_manifest_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """org-c was a party of version 1 and is revoked by version 2 (`echelon manifest
    rotate --remove org-c`); the run uses version 2. org-c's certificate is still valid
    and from the federation's CA, but it names no party of version 2: the coordinator and
    the log refuse it, and the others' run goes on. A service given an older kit than it
    last ran with refuses to start (a rolled-back kit would readmit org-c)."""
    config = dataclasses.replace(CONFIG, window=dataclasses.replace(CONFIG.window, min_cohort=2))
    run = start_run(tmp_path / "run", config=config, names=("org-a", "org-b"),
                    revoked=("org-c",))  # fmt: skip
    try:
        revoked = load_kit(run.root / "kits" / "org-c")  # version 1, still on org-c's disk
        assert revoked.manifest.version == 1
        assert run.kit("coordinator").manifest.version == 2
        transcript = attempt_session(
            kit_channel(run.address, revoked),
            hello_frame(
                "org-c",
                revoked.identity_key.public_key().public_bytes_raw(),
                prove_with=revoked.identity_key,
            ),
        )
        assert transcript.code == grpc.StatusCode.PERMISSION_DENIED, transcript
        assert "want the certificate identity of exactly one party of run" in transcript.detail
        assert "version 2" in transcript.detail and transcript.frames == []
        with kit_channel(run.audit_address, revoked, "audit-log") as channel:
            stub = audit_pb2_grpc.AuditLogStub(channel)
            code, detail = refused(
                lambda: stub.GetTreeHead(audit_pb2.GetTreeHeadRequest(ref=new_ref(0)), timeout=5)
            )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "version 2" in detail
        digests = run.finish()
        assert len(digests) == 1
        assert all(c.contributors == ("org-a", "org-b") for c in run.sites.commits)
    finally:
        run.sites.close()
    # The rotation is on the log: version 2 is the manifest recorded, and verify refuses to
    # take version 1 (still on org-c's disk) for the run's.
    db = str(run.root / "audit" / "log.db")
    assert audit_cli(["verify", "--db", db, "--manifest", str(run.root / "kits" / "auditor")]) == 0
    assert capsys.readouterr().out.count("manifest versions recorded: 2") == 1
    assert audit_cli(["verify", "--db", db, "--manifest", str(run.root / "kits" / "org-c")]) == 1
    out = capsys.readouterr().out
    assert "[manifest]" in out and "is not the one given" in out, out[-1500:]
    # The coordinator's version-1 kit is refused once it ran under version 2.
    old = tmp_path / "old-kit"
    shutil.copytree(run.root / "kits" / "coordinator", old)
    (old / "manifest.json").write_bytes(
        (run.root / "kits" / "org-c" / "manifest.json").read_bytes()
    )
    data = tmp_path / "coordinator-data"
    common = ServiceConfig(
        host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=-1,
        data_dir=data, kit=str(run.root / "kits" / "coordinator"),
    )  # fmt: skip
    load_transport(common, "coordinator", PartyRole.COORDINATOR)
    with pytest.raises(TransportError, match="last ran under version 2"):
        load_transport(dataclasses.replace(common, kit=str(old)), "coordinator",
                       PartyRole.COORDINATOR)  # fmt: skip
