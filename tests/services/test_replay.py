"""Deterministic replay: global versions rebuilt from stored aggregates match, bit for bit,
the digests recorded on the audit log; a tampered aggregate is caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.global_coordinator.replay import ReplayMismatch, replay

from .harness import Sites


def _run_windows(tmp_path: Path, windows: int) -> Sites:
    sites = Sites(tmp_path, ["org-a", "org-b", "org-c"])
    for _ in range(windows):
        sites.heartbeat_all()
        outcome = sites.driver.step()
        assert outcome is not None and outcome.committed, outcome
    return sites


def test_replay_rebuilds_every_version(tmp_path: Path) -> None:
    sites = _run_windows(tmp_path, 3)
    try:
        done = replay(tmp_path / "coordinator" / "state", tmp_path / "audit" / "log.db")
        assert [v.version for v in done] == [1, 2, 3]
        # three sent records (one per receiver) and three received records
        assert [v.audited_by for v in done] == [6, 6, 6]
    finally:
        sites.close()


def test_replay_catches_a_tampered_aggregate(tmp_path: Path) -> None:
    sites = _run_windows(tmp_path, 2)
    sites.close()
    path = tmp_path / "coordinator" / "state" / "aggregates" / "w000002.npy"
    aggregate = np.load(path)
    aggregate[0] += 1e-3
    np.save(path, aggregate)
    with pytest.raises(ReplayMismatch, match="window 2: stored aggregate"):
        replay(tmp_path / "coordinator" / "state", tmp_path / "audit" / "log.db")
