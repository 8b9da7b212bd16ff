"""Deterministic replay: global versions rebuilt from the coordinator's stored aggregates
match, bit for bit, the digests recorded on the audit log by a real sessions run; a
tampered aggregate is caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.global_coordinator.replay import ReplayMismatch, replay

from .sessions import federation_config, start_sites

pytestmark = pytest.mark.timeout(90)


def _run_windows(tmp_path: Path, windows: int) -> tuple[Path, Path]:
    """Runs `windows` committed windows; returns the coordinator's state dir and the log."""
    state = tmp_path / "coordinator" / "state"
    sites = start_sites(federation_config(windows=windows), audit=tmp_path, state=state)
    try:
        assert sites.run(), "the run did not finish"
        assert [o.committed for o in sites.coordinator.outcomes] == [True] * windows
        # Every agent received (and so recorded) the last version before the sites close.
        for agent in sites.agents.values():
            assert agent.wait(lambda a=agent: a.status().held_version >= windows, 30.0)
    finally:
        sites.close()
    assert sites.audit is not None
    return state, sites.audit.db


def test_replay_rebuilds_every_version(tmp_path: Path) -> None:
    state, db = _run_windows(tmp_path, 3)
    done = replay(state, db)
    assert [v.version for v in done] == [1, 2, 3]
    # each version is sent to three agents and received by each: six records carry its digest
    assert [v.audited_by for v in done] == [6, 6, 6]


def test_replay_catches_a_tampered_aggregate(tmp_path: Path) -> None:
    state, db = _run_windows(tmp_path, 2)
    path = state / "aggregates" / "w000002.npy"
    aggregate = np.load(path)
    aggregate[0] += 1e-3
    np.save(path, aggregate)
    with pytest.raises(ReplayMismatch, match="window 2: stored aggregate"):
        replay(state, db)
