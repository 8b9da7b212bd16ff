"""The agent's durable protocol state: written privately and atomically, read back whole."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from echelon.protocol.boundary import BoundaryState
from echelon.protocol.events import TrainedDelta
from services.boundary_agent.state import STATE_FILE, load_state, save_state


def test_state_round_trips_in_a_private_file(tmp_path: Path) -> None:
    delta = np.arange(6, dtype=np.float32) / 7
    state = BoundaryState(
        held_version=3,
        phi=np.ones(6, dtype=np.float32),
        pending=(TrainedDelta(delta=delta, base_version=2, tokens=99, devices=2, train_loss=1.5),),
        last_window=4,
        lost=1,
        dropped=2,
    )
    save_state(tmp_path / "state", state)
    back = load_state(tmp_path / "state")
    assert back is not None
    assert (back.held_version, back.last_window, back.lost, back.dropped) == (3, 4, 1, 2)
    np.testing.assert_array_equal(back.pending[0].delta, delta)
    assert back.pending[0].tokens == 99 and back.pending[0].base_version == 2
    mode = stat.S_IMODE((tmp_path / "state" / STATE_FILE).stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_no_state_before_the_first_save_and_a_torn_file_is_refused(tmp_path: Path) -> None:
    assert load_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises((ValueError, OSError)):
        load_state(tmp_path)
