"""What the coordinator learns: a transcript of everything it received holds no statistic
of any one boundary in the clear (only window, base version and device count beside masked
vectors), and the drift-aware controller still moves H on the summed, masked signals."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from echelon.controller import SyncControllerConfig
from echelon.protocol.messages import (
    ContributionSent,
    Declined,
    Joined,
    KeysAdvertised,
    SharesReleased,
    SharesSent,
    SurvivorsSigned,
)
from echelon.protocol.stats import STATS
from tests.protocol.harness import DIM, make_world, protocol_config

pytestmark = pytest.mark.timeout(60)

#: Each message a boundary may send, and its fields besides the window.
CLEAR = {
    Joined: {"held_version"},
    KeysAdvertised: {"advertisement"},
    SharesSent: {"shares"},
    ContributionSent: {"base_version", "devices", "vector"},
    SurvivorsSigned: {"signature"},
    SharesReleased: {"shares"},
    Declined: {"reason"},
}


def test_the_coordinator_receives_no_statistic_in_the_clear() -> None:
    world = make_world()
    trace = world.run()
    received = [m for _, s, r, m in trace.messages if r == "coordinator"]
    assert received
    for message in received:
        assert type(message) in CLEAR, type(message)
        names = {f.name for f in fields(message)} - {"window"}
        assert names == CLEAR[type(message)], (type(message), names)
    vectors = [m.vector for m in received if isinstance(m, ContributionSent)]
    assert vectors and all(v.dtype == np.uint32 and v.shape == (DIM + len(STATS) + 1,)
                           for v in vectors)  # fmt: skip
    # The statistics' coordinates are masked like the delta's: they look uniform over
    # Z_(2^32), nothing like the small fixed-point values they encode.
    tails = np.concatenate([v[DIM:] for v in vectors]).astype(np.float64)
    assert tails.mean() > 2**29


def test_the_controller_moves_h_on_summed_signals() -> None:
    # Thresholds that call every window calm (the scripted deltas are random): the point is
    # that the controller runs on the cohort's masked sums and moves H.
    controller = SyncControllerConfig(
        h_min=1, h_max=8, patience=1, agreement_low=0.0, agreement_high=0.0,
        cosine_low=-1.0, cosine_high=-1.0, drift_high=1e9, loss_rise=1e9,
    )  # fmt: skip
    config = protocol_config(controller=controller, windows=4)
    world = make_world(config=config)
    trace = world.run()
    steps = [o.inner_steps for o in trace.outcomes]
    assert steps[0] < steps[-1], steps  # calm windows: H grows
    assert all("drift_rms" in o.signals and "agreement" in o.signals for o in trace.outcomes)
