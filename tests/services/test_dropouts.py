"""Dropouts over real processes: 3 organizations x 3 devices with both levels of secure
aggregation; mid-window, one device of org-b and the whole of org-c (agent and workers) are
killed. The window completes with what the survivors contributed, the audit log shows the
unmasking that removed the dropped parties' masks, and training continues."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from echelon.audit.record import PayloadType
from echelon.audit.store import read_records
from echelon.training.corpus import cached_domain
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from echelon_tools.launcher import Deployment, DeploymentSpec, Site
from services.common.wire import new_ref

from .logs import wait_for_event

pytestmark = pytest.mark.timeout(600)
STEPS, BATCH, SEQ, UNIT = 40, 4, 64, 4096.0
TOKENS_PER_DEVICE = STEPS * BATCH * SEQ


def spawned_workers(pid: int) -> list[int]:
    """Pids of the multiprocessing-spawned device workers of an agent process."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            workers.append(int(entry.name))
    return sorted(workers)


def _versions(deployment: Deployment) -> list[coordinator_pb2.VersionInfo]:
    with grpc.insecure_channel(deployment.services["coordinator"].address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        return list(
            stub.ListVersions(
                coordinator_pb2.ListVersionsRequest(ref=new_ref(0)), timeout=5
            ).versions
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("dropouts")
    texts = [
        cached_domain(d, root / "corpus", max_bytes=200_000).path
        for d in ("stdlib-a", "stdlib-b", "stdlib-c")
    ]
    spec = DeploymentSpec(
        root=root / "run",
        sites=tuple(
            Site(boundary=f"org-{x}", data_files=(t,), workers=3)
            for x, t in zip("abc", texts, strict=True)
        ),
        tokenizer_files=tuple(texts),
        coordinator_tables={
            "coordinator": {"run_id": "dropouts", "token_unit": UNIT},
            "window": {"inner_steps": STEPS, "deadline_s": 120.0, "min_cohort": 2},
            "inner": {"lr": 0.005, "batch_size": BATCH, "seq_len": SEQ},
            "secagg": {"level1": True, "level2": True},
        },
        agent_tables={
            "data": {"seq_len": SEQ, "max_tokens_per_file": 40_000},
            "tokenizer": {"vocab_size": 512},
            "inner": {"batch_size": BATCH, "seq_len": SEQ, "warmup_steps": 2, "total_steps": 200},
            "devices": {"eval_batches": 1, "restart_dead_workers": False},
        },
    )
    deployment = Deployment(spec)
    with deployment:
        deployment.start(timeout_s=300)
        give_up = time.monotonic() + 300
        while time.monotonic() < give_up:  # until a version holds all three organizations
            full = [v for v in _versions(deployment) if len(v.contributors) == 3]
            if full:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no window with all three organizations")
        # org-b's devices start the next run from that version: kill while they train it.
        agent_b = deployment.services["org-b"]
        wait_for_event(
            agent_b.log_path,
            "devices_training",
            timeout_s=120,
            where=lambda entry: entry["version"] == full[0].version,
            alive=lambda: agent_b.process.poll() is None,
        )
        victim = spawned_workers(deployment.services["org-b"].process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        os.killpg(deployment.services["org-c"].process.pid, signal.SIGKILL)
        deployment.services["org-c"].process.wait()
        del deployment.services["org-c"]
        before = len(_versions(deployment))
        deployment.wait_windows(before + 1, timeout_s=300)  # versions count version 0
        versions = _versions(deployment)[full[0].version :]
        deployment.stop()
    records = read_records(deployment.audit_db)
    yield {"versions": versions, "records": records}


def test_window_with_dropouts_sums_exactly_the_survivors(run: dict[str, object]) -> None:
    versions = run["versions"]
    assert isinstance(versions, list)
    first, second = versions[0], versions[1]
    assert list(first.contributors) == ["org-a", "org-b", "org-c"]
    assert list(second.contributors) == ["org-a", "org-b"]
    # org-a's three devices and org-b's two survivors; weights are tokens / unit.
    assert second.weight_sum == pytest.approx(5 * TOKENS_PER_DEVICE / UNIT, abs=1e-3)
    assert first.weight_sum == pytest.approx(9 * TOKENS_PER_DEVICE / UNIT, abs=1e-3)


def test_training_continues_after_the_dropouts(run: dict[str, object]) -> None:
    versions = run["versions"]
    assert isinstance(versions, list)
    assert len(versions) >= 3 and list(versions[2].contributors) == ["org-a", "org-b"]


def test_audit_log_shows_the_unmasking(run: dict[str, object]) -> None:
    records = run["records"]
    assert isinstance(records, list)
    window = run["versions"][1].window  # type: ignore[index]
    unmasking = {
        r.sender
        for r in records
        if r.payload_type == PayloadType.UNMASKING_SHARES and r.window == window
    }
    assert unmasking == {"org-a", "org-b"}
    deltas = {
        r.sender
        for r in records
        if r.payload_type == PayloadType.MASKED_DELTA and r.window == window
    }
    assert "org-c" not in deltas
