"""A real DevicePool: spawned workers, a gloo group, windows, evaluation, a killed worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from echelon.device.pool import DevicePool, PoolConfig, PoolError, PoolStage
from echelon.training.adapter import flatten
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig, build_model, lora_state
from echelon.training.tokenizer import TextTokenizer

from ..faults import FaultPlan, kill_and_wait

MODEL = ModelConfig(layers=1, hidden=64, heads=2, intermediate=128, max_seq=64)
BATCH, SEQ = 4, 32
AGENT = "agent"  # the party name of the pool's own stages in a FaultPlan


def _config(
    corpus: tuple[Path, Path], tokenizer_dir: Path, work_dir: Path, *, restart: bool = False
) -> PoolConfig:
    return PoolConfig(
        restart_dead_workers=restart,
        n_workers=2,
        data=DataConfig(files=corpus, seq_len=SEQ, max_tokens_per_file=20_000),
        tokenizer_dir=tokenizer_dir,
        work_dir=work_dir,
        model_cfg=MODEL,
        inner_cfg=InnerConfig(
            lr=1e-2, warmup_steps=2, total_steps=200, batch_size=BATCH, seq_len=SEQ
        ),
        collective_timeout_s=10.0,
        eval_batches=4,
    )


def _initial_adapter(tokenizer: TextTokenizer) -> np.ndarray:
    model, layout = build_model(MODEL, LoraConfig(), tokenizer.vocab_size)
    return flatten(lora_state(model, layout), layout)


def test_windows_lower_validation_loss_and_sum_token_weights(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    theta = _initial_adapter(tokenizer)
    steps = 15
    with DevicePool(_config(corpus_files, tokenizer_dir, tmp_path)) as pool:
        assert pool.layout().numel == theta.shape[0]
        initial = pool.evaluate(theta)
        results = []
        for window in range(2):
            result = pool.run_window(
                window=window, global_flat=theta, steps=steps, inner=None, deadline_s=120.0
            )
            theta = (theta - result.delta_sum / result.weight_sum).astype(np.float32)
            results.append(result)
        scheduled = pool.evaluation()  # eval_every 1: the last window's, run after it
        final = pool.evaluate(theta)

    for result in results:
        assert result.devices == 2
        assert result.weight_sum == 2 * steps * BATCH * SEQ
        assert result.tokens == int(result.weight_sum)
        assert result.delta_sum.dtype == np.float64 and result.delta_sum.shape == theta.shape
        assert np.isfinite(result.train_loss)
    assert scheduled is not None and scheduled.window == 1
    assert scheduled.loss == pytest.approx(final, rel=1e-4)
    assert final < initial - 0.05
    # Each device's optimizer state, in its own private directory, loadable as weights only.
    dirs = sorted(tmp_path.glob("worker-*"))
    assert [d.name for d in dirs] == ["worker-0", "worker-1"]
    for d in dirs:
        assert d.stat().st_mode & 0o777 == 0o700
        saved = torch.load(d / "state.pt", weights_only=True)
        assert saved["inner"]["step"] == 2 * steps


def test_killed_worker_is_dropped_and_survivor_continues(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    theta = _initial_adapter(tokenizer)
    faults = FaultPlan()
    config = _config(corpus_files, tokenizer_dir, tmp_path)
    with DevicePool(config, on_stage=faults.observer(AGENT)) as pool:
        victim = pool.worker_pids()[1]
        # Kill mid-window: once worker 1 holds theta_v, before it can have trained 250 steps.
        faults.fail_at(AGENT, PoolStage.THETA_SENT, window=0, action=lambda: kill_and_wait(victim))
        hit = pool.run_window(window=0, global_flat=theta, steps=250, inner=None, deadline_s=120.0)
        after = pool.run_window(window=1, global_flat=theta, steps=5, inner=None, deadline_s=60.0)

        assert faults.unfired() == []
        assert hit.devices == 1
        assert hit.weight_sum == 250 * BATCH * SEQ
        assert pool.alive_workers() == 1
        assert list(pool.worker_pids()) == [0]
        assert after.devices == 1 and after.weight_sum == 5 * BATCH * SEQ
    with pytest.raises(PoolError, match="closed"):
        pool.run_window(window=2, global_flat=theta, steps=1, inner=None, deadline_s=10.0)


def test_dead_worker_is_restarted_on_its_shard(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    theta = _initial_adapter(tokenizer)
    with DevicePool(_config(corpus_files, tokenizer_dir, tmp_path, restart=True)) as pool:
        pool.run_window(window=0, global_flat=theta, steps=2, inner=None, deadline_s=60.0)
        old = pool.worker_pids()
        kill_and_wait(old[1])
        assert pool.alive_workers() == 1

        result = pool.run_window(window=1, global_flat=theta, steps=2, inner=None, deadline_s=60.0)

        assert result.devices == 2
        assert result.weight_sum == 2 * 2 * BATCH * SEQ
        new = pool.worker_pids()
        assert new[0] == old[0] and new[1] != old[1]
