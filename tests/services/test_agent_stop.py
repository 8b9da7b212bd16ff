"""A stop at any moment exits cleanly (issue 10, item 5): an agent of an Echelon-DA run that
gets SIGTERM while its devices train a delay-aware overlap exits 0, with no C++ abort from a
thread left inside gloo, and leaves no worker process behind; evaluation is on a schedule
(`[devices].eval_every`, 0 here: none during the run)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from echelon.training.corpus import cached_domain
from echelon_tools.launcher import Deployment, DeploymentSpec, Site

from .logs import log_events, wait_for_event
from .test_dropouts import spawned_workers

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("agent-stop")
    cache = root / "corpus"
    a = cached_domain("stdlib-a", cache, max_bytes=200_000).path
    b = cached_domain("stdlib-b", cache, max_bytes=200_000).path
    spec = DeploymentSpec(
        root=root / "run",
        sites=(Site(boundary="org-a", data_files=(a,)), Site(boundary="org-b", data_files=(b,))),
        tokenizer_files=(a, b),
        coordinator_tables={
            "coordinator": {
                "run_id": "agent-stop",
                "windows": 50,
                "token_unit": 4096.0,
                "delay_aware": True,
            },
            "window": {"inner_steps": 40, "deadline_s": 240.0},
            "inner": {"lr": 0.005, "batch_size": 4, "seq_len": 64},
            "secagg": {"level1": True, "level2": True},
        },
        agent_tables={
            "data": {"seq_len": 64, "max_tokens_per_file": 40_000},
            "tokenizer": {"vocab_size": 512},
            "inner": {"batch_size": 4, "seq_len": 64, "warmup_steps": 2, "total_steps": 400},
            "devices": {"eval_batches": 1, "eval_every": 0},
        },
    )
    with Deployment(spec) as running:
        running.start(timeout_s=240)
        yield running


def test_sigterm_during_an_overlap_exits_cleanly(deployment: Deployment) -> None:
    agent = deployment.services["org-a"]
    process = agent.process
    # The devices are training an overlap: a run that continues from where the last left.
    wait_for_event(
        agent.log_path,
        "devices_training",
        timeout_s=300,
        where=lambda entry: entry.get("fresh") is False,
        alive=lambda: process.poll() is None,
    )
    workers = spawned_workers(process.pid)
    assert workers, "the agent's device workers"
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=90)
    log = agent.log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "terminate called" not in log
    # The stop came while the overlap's run was in the pool: it failed out, then the pool shut.
    assert log_events(agent.log_path, "pool_closing_mid_call")
    assert log_events(agent.log_path, "training_stopped")
    assert [event["event"] for event in log_events(agent.log_path, "pool_closed")] == [
        "pool_closed"
    ]
    assert not [pid for pid in workers if _alive(pid)], "a device worker outlived its agent"
    # eval_every = 0: no held-out evaluation ran between windows.
    assert log_events(agent.log_path, "pool_eval_done") == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":  # exited, not yet reaped by its new parent
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
