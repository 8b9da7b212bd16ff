"""An organization's own floor over real processes: an agent whose `[floor]` requires level 1
is offered a run with level 1 off; it refuses the run at Welcome, before its devices start,
says why in its log, and exits non-zero, while the run it refused is on its audit log."""

from __future__ import annotations

import pytest

from echelon.audit.record import Direction, PayloadType
from echelon.audit.store import read_records
from echelon.training.corpus import cached_domain
from echelon_tools.launcher import Deployment, DeploymentSpec, LaunchError, Site

from .logs import log_events, wait_for_event

pytestmark = pytest.mark.timeout(240)


def test_an_agent_refuses_a_run_below_its_floor(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("floor")
    text = cached_domain("stdlib-a", root / "corpus", max_bytes=100_000).path
    spec = DeploymentSpec(
        root=root / "run",
        sites=(Site(boundary="org-a", data_files=(text,)),),
        tokenizer_files=(text,),
        coordinator_tables={
            "coordinator": {"run_id": "floor", "windows": 1},
            "secagg": {"level1": False, "level2": True},
        },
        agent_tables={
            "tokenizer": {"vocab_size": 512},
            "floor": {"require_level1": True, "min_k_min": 2, "max_inner_steps": 500},
        },
    )
    with Deployment(spec) as deployment:
        deployment.start(timeout_s=180)
        agent = deployment.services["org-a"]
        refused = wait_for_event(
            agent.log_path,
            "run_refused",
            timeout_s=120,
            alive=lambda: (
                agent.process.poll() is None or bool(log_events(agent.log_path, "run_refused"))
            ),
        )
        code = agent.process.wait(timeout=60)
        records = read_records(deployment.audit_db)

    assert "below this organization's floor" in refused["reason"]
    assert "level 1" in refused["reason"]
    assert code == 1
    assert log_events(agent.log_path, "devices_ready") == []  # refused before any device
    assert any(
        r.payload_type == PayloadType.RUN_CONFIG
        and r.receiver == "org-a"
        and r.direction == Direction.RECEIVED
        for r in records
    )


def test_an_agent_with_fewer_workers_than_k_min_says_so_once_and_stops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One worker under level 1 with k_min 2: no window could ever be summed inside the
    boundary. The agent says so once and exits 1, rather than declining every window."""
    root = tmp_path_factory.mktemp("workers")
    text = cached_domain("stdlib-a", root / "corpus", max_bytes=100_000).path
    spec = DeploymentSpec(
        root=root / "run",
        sites=(Site(boundary="org-a", data_files=(text,), workers=1),),
        tokenizer_files=(text,),
        coordinator_tables={
            "coordinator": {"run_id": "workers", "windows": 1},
            "secagg": {"level1": True, "level2": True, "k_min": 2},
        },
        agent_tables={"tokenizer": {"vocab_size": 512}},
    )
    with Deployment(spec) as deployment:
        deployment.start(timeout_s=180)
        agent = deployment.services["org-a"]
        event = wait_for_event(
            agent.log_path,
            "devices_below_k_min",
            timeout_s=120,
            alive=lambda: (
                agent.process.poll() is None
                or bool(log_events(agent.log_path, "devices_below_k_min"))
            ),
        )
        code = agent.process.wait(timeout=60)

    assert (event["workers"], event["want"]) == (1, 2)
    assert code == 1
    assert len(log_events(agent.log_path, "devices_below_k_min")) == 1
    assert log_events(agent.log_path, "devices_ready") == []


def test_an_agent_refuses_a_manifest_below_its_floor_and_says_so_on_the_log(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Over mTLS: the signed manifest itself (k_min 2) is weaker than org-a's floor
    (min_k_min 3). The agent refuses it at start, before its devices or its session,
    exits 1, and its refusal (the manifest's digest and the reason) is on the audit log."""
    root = tmp_path_factory.mktemp("manifest-floor")
    text = cached_domain("stdlib-a", root / "corpus", max_bytes=100_000).path
    spec = DeploymentSpec(
        root=root / "run",
        # (a manifest names at least m_min = 2 boundaries; both have the same floor here)
        sites=(
            Site(boundary="org-a", data_files=(text,)),
            Site(boundary="org-b", data_files=(text,)),
        ),
        tokenizer_files=(text,),
        coordinator_tables={
            "coordinator": {"run_id": "manifest-floor", "windows": 1},
            "secagg": {"level1": True, "level2": True, "k_min": 2},
        },
        agent_tables={"tokenizer": {"vocab_size": 512}, "floor": {"min_k_min": 3}},
        mtls=True,
    )
    with Deployment(spec) as deployment:
        # The agent exits before it ever listens: the launcher says so.
        with pytest.raises(LaunchError, match="org-a exited with 1"):
            deployment.start(timeout_s=180)
        agent = deployment.services["org-a"]
        records = read_records(deployment.audit_db)

    refused = log_events(agent.log_path, "run_refused")
    assert agent.process.returncode == 1
    assert len(refused) == 1 and "manifest below this organization's floor" in refused[0]["reason"]
    assert log_events(agent.log_path, "devices_ready") == []
    assert log_events(agent.log_path, "session_open") == []
    refusals = [
        r
        for r in records
        if r.payload_type == PayloadType.MANIFEST
        and r.receiver == "org-a"
        and r.direction == Direction.RECEIVED
        and not r.verdict.accepted
    ]
    assert len(refusals) == 1 and "k_min" in refusals[0].verdict.reason
