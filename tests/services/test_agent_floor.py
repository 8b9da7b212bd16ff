"""An organization's own floor over real processes: an agent whose `[floor]` requires level 1
is offered a run with level 1 off; it refuses the run at Welcome, before its devices start,
says why in its log, and exits non-zero, while the run it refused is on its audit log."""

from __future__ import annotations

import pytest

from echelon.audit.record import Direction, PayloadType
from echelon.audit.store import read_records
from echelon.training.corpus import cached_domain
from echelon_tools.launcher import Deployment, DeploymentSpec, Site

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
