"""End to end over real processes: an audit log, a coordinator and two boundary agents, each
agent with two spawned device workers, adapt a tiny Llama's LoRA adapter on real text.

Checks the issue's acceptance: the global version advances, both boundaries' contributions
are averaged into every version, the audit log verifies (every crossing recorded by sender
and receiver with matching digests), held-out loss falls, the result exports as a peft
adapter, and every process shuts down cleanly.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from echelon.audit.record import Direction, PayloadType
from echelon.audit.store import read_records
from echelon.training.corpus import cached_domain
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from echelon_tools.audit import main as audit_cli
from echelon_tools.evaluate import generate_sample, heldout_losses
from echelon_tools.launcher import Deployment, DeploymentSpec, Site
from services.common.wire import new_ref

from .logs import log_events, wait_for_event
from .sockets import is_loopback, process_sockets

WINDOWS = 3
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, dict]]:
    root = tmp_path_factory.mktemp("multisite")
    cache = root / "corpus"
    a = cached_domain("stdlib-a", cache, max_bytes=300_000).path
    b = cached_domain("stdlib-b", cache, max_bytes=300_000).path
    spec = DeploymentSpec(
        root=root / "run",
        mtls=True,  # every service from its kit of a provisioned, signed manifest
        sites=(Site(boundary="org-a", data_files=(a,)), Site(boundary="org-b", data_files=(b,))),
        tokenizer_files=(a, b),
        coordinator_tables={
            "coordinator": {"run_id": "e2e", "windows": WINDOWS, "token_unit": 4096.0},
            "window": {"inner_steps": 12, "deadline_s": 240.0},
            "inner": {"lr": 0.005, "batch_size": 4, "seq_len": 64},
            "secagg": {"level1": False, "level2": True},
        },
        agent_tables={
            "data": {"seq_len": 64, "max_tokens_per_file": 60_000},
            "tokenizer": {"vocab_size": 1024},
            "inner": {"batch_size": 4, "seq_len": 64, "warmup_steps": 2, "total_steps": 60},
            "devices": {"eval_batches": 2},
        },
    )
    deployment = Deployment(spec)
    with deployment:
        deployment.start(timeout_s=240)
        deployment.wait_windows(WINDOWS, timeout_s=420)
        # Evaluation on a schedule: after every window (eval_every 1), and of the last version.
        finals = {
            org: wait_for_event(
                deployment.services[org].log_path, "final_evaluation", timeout_s=120
            )
            for org in ("org-a", "org-b")
        }
        sockets = {
            name: process_sockets(service.process.pid)
            for name, service in deployment.services.items()
        }
        with deployment.channel("coordinator") as channel:
            versions = coordinator_pb2_grpc.CoordinatorStub(channel).ListVersions(
                coordinator_pb2.ListVersionsRequest(ref=new_ref(0)), timeout=5
            )
        codes = deployment.stop()
    yield (
        deployment,
        {
            "versions": versions,
            "codes": codes,
            "sockets": sockets,
            "finals": finals,
        },
    )


def test_every_process_stops_cleanly(finished: tuple[Deployment, dict]) -> None:
    _, facts = finished
    assert facts["codes"] == {"org-a": 0, "org-b": 0, "coordinator": 0, "audit-log": 0}


def test_versions_advance_and_average_both_boundaries(finished: tuple[Deployment, dict]) -> None:
    _, facts = finished
    versions = facts["versions"].versions
    assert [v.version for v in versions][: WINDOWS + 1] == list(range(WINDOWS + 1))
    for v in versions[1 : WINDOWS + 1]:
        assert list(v.contributors) == ["org-a", "org-b"]
        assert v.weight_sum > 0


def test_audit_log_verifies_with_matching_digests(finished: tuple[Deployment, dict]) -> None:
    deployment, facts = finished
    db = deployment.audit_db
    assert deployment.manifest is not None
    assert audit_cli(["verify", "--db", str(db), "--manifest", str(deployment.manifest)]) == 0
    records = read_records(db)
    sent = {
        (r.payload_type, r.window, r.receiver, r.payload_sha256)
        for r in records
        if r.direction == Direction.SENT
    }
    got = {
        (r.payload_type, r.window, r.receiver, r.payload_sha256)
        for r in records
        if r.direction == Direction.RECEIVED
    }
    crossing = {k for k in sent if k[2] != "audit-log"}
    assert crossing and crossing <= got
    assert {PayloadType.MASKED_DELTA, PayloadType.GLOBAL_ADAPTER} <= {k[0] for k in crossing}
    # The digest the receivers recorded for each global version is that of the stored adapter.
    state = deployment.coordinator_state
    for v in facts["versions"].versions[1 : WINDOWS + 1]:
        stored = state / "versions" / f"v{v.version:06d}.npy"
        assert stored.exists()
        assert any(k[0] == PayloadType.GLOBAL_ADAPTER and k[3] == v.sha256 for k in got)


def test_heldout_loss_falls_and_adapter_exports(finished: tuple[Deployment, dict]) -> None:
    deployment, facts = finished
    losses = heldout_losses(deployment, ["org-a", "org-b"], max_batches=8)
    for org, (before, after) in losses.items():
        assert after < before - 0.05, (org, before, after)
        # The agent's own evaluation of the last version, on its devices, agrees in kind.
        final = facts["finals"][org]
        assert final["version"] == WINDOWS and final["val_loss"] < before - 0.05
        scheduled = log_events(deployment.services[org].log_path, "pool_eval_done")
        assert [e["window"] for e in scheduled][: WINDOWS - 1] == list(range(1, WINDOWS))
    text = generate_sample(deployment, "org-a", deployment.spec.root / "export", tokens=8)
    assert text.startswith("In the beginning") and len(text) > len("In the beginning")
    assert (deployment.spec.root / "export" / "adapter" / "adapter_config.json").exists()


def test_organizations_dial_out_and_the_coordinator_dials_only_the_audit_log(
    finished: tuple[Deployment, dict],
) -> None:
    deployment, facts = finished
    sockets = facts["sockets"]
    services = deployment.services
    port = {name: s.ports["grpc"] for name, s in services.items()}
    listening = {
        name: {s.local[1] for s in socks if s.listening} for name, socks in sockets.items()
    }
    for site in ("org-a", "org-b"):
        # An agent listens only on loopback: its own status, health and metrics endpoints
        # (and its device workers' gloo store), nothing another organization can reach.
        exposed = [s for s in sockets[site] if s.listening and not is_loopback(s.local[0])]
        assert exposed == [], exposed
        # It dials out to the coordinator and the audit log.
        remote = {s.remote[1] for s in sockets[site] if s.established}
        assert {port["coordinator"], port["audit-log"]} <= remote
        # Nobody is connected to an agent's listening ports from outside it.
        for other, socks in sockets.items():
            if other != site:
                assert not {s.remote[1] for s in socks if s.established} & listening[site]
    # The coordinator's own connections go only to the audit log; every other one is an
    # agent's session into the coordinator's port.
    outbound = [
        s
        for s in sockets["coordinator"]
        if s.established and s.local[1] not in listening["coordinator"]
    ]
    assert outbound and {s.remote[1] for s in outbound} == {port["audit-log"]}
