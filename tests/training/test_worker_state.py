"""A device's saved optimizer state is loaded as weights only: a tampered file cannot run
code in the worker, and one for another layout or unreadable is set aside with a warning."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from echelon.device.worker import load_worker_state

CPU = torch.device("cpu")


class _RunsCode:
    """Unpickling this calls Path.touch on the marker: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_a_saved_state_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}, "step": 7}
    torch.save({"layout_digest": "abc", "inner": state}, path)

    loaded = load_worker_state(path, CPU, "abc")

    assert loaded is not None and loaded["step"] == 7
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(3))


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    path, marker = tmp_path / "state.pt", tmp_path / "ran"
    torch.save({"layout_digest": "abc", "inner": _RunsCode(marker)}, path)
    assert pickle.loads(pickle.dumps(_RunsCode(marker))) is None and marker.exists()  # it would
    marker.unlink()

    assert load_worker_state(path, CPU, "abc") is None
    assert not marker.exists()


def test_another_layout_or_no_file_or_garbage_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    assert load_worker_state(path, CPU, "abc") is None
    torch.save({"layout_digest": "other", "inner": {"step": 1}}, path)
    assert load_worker_state(path, CPU, "abc") is None
    path.write_bytes(b"not a checkpoint")
    assert load_worker_state(path, CPU, "abc") is None
