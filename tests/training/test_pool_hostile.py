"""Hostile devices at level 1 over real worker processes: in a real DevicePool (spawned
workers, the gloo group, the control pipes), one worker answers a round with bytes that do
not unpickle, a key advertisement for another window, a masked vector one word short or twice
as long (over gloo, the first was taken silently and the second aborted the agent's
process), or a bad survivor signature. It is put out with a reason, the window's sum is exactly the
honest devices' (or, for a bad signature, every masked vector's, its seed rebuilt from the
honest shares), and the pool goes on to the next window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from echelon.device.pool import DevicePool
from echelon.training.tokenizer import TextTokenizer

from .hostile_worker import Hostility, hostile_entry
from .test_pool_secure import (
    STEPS,
    Recorder,
    _config,
    _expected_sum,
    _initial_adapter,
    _true_updates,
)

pytestmark = pytest.mark.timeout(300)
HOSTILE = 2


@pytest.mark.parametrize(
    ("hostility", "in_sum"),
    [
        ("garbage", False),
        ("other_window", False),
        ("wrong_length", False),
        ("too_long", False),
        ("bad_signature", True),  # its vector arrived: a survivor, out of unmasking only
    ],
)
def test_a_hostile_worker_is_put_out_and_the_pool_goes_on(
    hostility: Hostility,
    in_sum: bool,
    corpus_files: tuple[Path, Path],
    tokenizer: TextTokenizer,
    tokenizer_dir: Path,
    tmp_path: Path,
) -> None:
    theta = _initial_adapter(tokenizer)
    recorder = Recorder()
    cfg = _config(corpus_files, tokenizer_dir, tmp_path, n_workers=3)
    with DevicePool(cfg, transcript=recorder, entry=hostile_entry(HOSTILE, hostility)) as pool:
        hit = pool.run_window(window=0, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0)
        left = sorted(pool.worker_pids())
        after = pool.run_window(
            window=1, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0
        )

    assert left == [0, 1]
    counted = [0, 1, HOSTILE] if in_sum else [0, 1]
    delta_sum, tokens, _ = _expected_sum(_true_updates(tmp_path, 0, counted))
    assert hit.devices == len(counted) and hit.tokens == tokens
    assert np.abs(hit.delta_sum - delta_sum).max() <= hit.error_bound
    assert {e.shard for e in recorder.of(0, "unmasking_shares")} == {0, 1}
    delta_sum, tokens, _ = _expected_sum(_true_updates(tmp_path, 1, [0, 1]))
    assert after.devices == 2 and after.tokens == tokens
    assert np.abs(after.delta_sum - delta_sum).max() <= after.error_bound
