"""Level-1 secure aggregation in a real DevicePool: spawned workers mask their updates for one
another, the agent unmasks only the sum, dropouts are survived, too few devices are refused,
and nothing the agent receives reveals one device's update."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from echelon.device.pool import (
    DevicePool,
    DeviceWindowResult,
    PoolConfig,
    RefusalReason,
    TranscriptEntry,
    WindowRefused,
    device_secagg_config,
)
from echelon.training.adapter import flatten
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig, build_model, lora_state
from echelon.training.tokenizer import TextTokenizer

from ..faults import FaultPlan, kill_and_wait

MODEL = ModelConfig(layers=1, hidden=64, heads=2, intermediate=128, max_seq=64)
BATCH, SEQ, STEPS = 4, 32, 3
SECURE = device_secagg_config(max_devices=8)
KEY_MATERIAL = {"advertisement", "encrypted_share", "survivor_signature", "unmasking_shares"}


def _config(
    corpus: tuple[Path, Path],
    tokenizer_dir: Path,
    work_dir: Path,
    *,
    n_workers: int,
    k_min: int = 2,
    restart: bool = False,
) -> PoolConfig:
    return PoolConfig(
        n_workers=n_workers,
        data=DataConfig(files=corpus, seq_len=SEQ, max_tokens_per_file=20_000),
        tokenizer_dir=tokenizer_dir,
        work_dir=work_dir,
        model_cfg=MODEL,
        inner_cfg=InnerConfig(
            lr=1e-2, warmup_steps=1, total_steps=100, batch_size=BATCH, seq_len=SEQ
        ),
        collective_timeout_s=10.0,
        eval_every=0,
        restart_dead_workers=restart,
        secure=SECURE,
        k_min=k_min,
        record_updates=True,
    )


def _initial_adapter(tokenizer: TextTokenizer) -> np.ndarray:
    model, layout = build_model(MODEL, LoraConfig(), tokenizer.vocab_size)
    return flatten(lora_state(model, layout), layout)


@dataclass
class Update:
    """A worker's true update, written to its own work_dir in test mode."""

    delta: np.ndarray
    tokens: int
    train_loss: float


def _true_updates(work_dir: Path, window: int, shards: Iterable[int]) -> dict[int, Update]:
    updates = {}
    for shard in shards:
        with np.load(work_dir / f"update-w{window}-s{shard}.npz") as saved:
            updates[shard] = Update(
                saved["delta"], int(saved["tokens"]), float(saved["train_loss"])
            )
    return updates


@dataclass
class Recorder:
    """The transcript hook: keeps every entry and reports each to `faults` as the stage
    `kind` of party `shard` (fault injection: `faults.fail_at(shard, kind, action=...)`)."""

    entries: list[TranscriptEntry] = field(default_factory=list)
    faults: FaultPlan = field(default_factory=FaultPlan)

    def __call__(self, entry: TranscriptEntry) -> None:
        self.entries.append(entry)
        self.faults.reached(entry.shard, entry.kind, entry.window)

    def kill_on(self, kind: str, shard: int, pid: int) -> None:
        """SIGKILL `pid` (and wait until it is gone) when `shard`'s first `kind` arrives."""
        self.faults.fail_at(shard, kind, action=lambda: kill_and_wait(pid))

    def of(self, window: int, kind: str) -> list[TranscriptEntry]:
        return [e for e in self.entries if e.window == window and e.kind == kind]


def _expected_sum(updates: dict[int, Update]) -> tuple[np.ndarray, int, float]:
    """The float path's sum: sum tokens_i * clip(delta_i), sum tokens_i, weighted loss."""
    clip = SECURE.clip
    delta_sum = sum(u.tokens * np.clip(u.delta, -clip, clip) for u in updates.values())
    tokens = sum(u.tokens for u in updates.values())
    loss = sum(u.tokens * u.train_loss for u in updates.values()) / tokens
    assert isinstance(delta_sum, np.ndarray)
    return delta_sum, tokens, loss


@dataclass(frozen=True)
class SecureWindow:
    """One level-1 window of 3 workers: its result, the agent's transcript, the true updates."""

    result: DeviceWindowResult
    recorder: Recorder
    updates: dict[int, Update]
    numel: int


@pytest.fixture(scope="module")
def secure_window(
    corpus_files: tuple[Path, Path],
    tokenizer: TextTokenizer,
    tokenizer_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> SecureWindow:
    # Shared by the two tests below (spawning workers dominates their cost).
    theta = _initial_adapter(tokenizer)
    work_dir = tmp_path_factory.mktemp("secure-window")
    recorder = Recorder()
    cfg = _config(corpus_files, tokenizer_dir, work_dir, n_workers=3)
    with DevicePool(cfg, transcript=recorder) as pool:
        result = pool.run_window(
            window=0, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0
        )
    return SecureWindow(result, recorder, _true_updates(work_dir, 0, range(3)), theta.shape[0])


def test_secure_sum_equals_float_sum_within_quantization_bound(
    secure_window: SecureWindow,
) -> None:
    result, updates = secure_window.result, secure_window.updates

    delta_sum, tokens, loss = _expected_sum(updates)

    assert all(np.abs(u.delta).max() < SECURE.clip for u in updates.values())  # nothing clipped
    assert result.devices == 3
    assert result.tokens == tokens == 3 * STEPS * BATCH * SEQ
    assert 0 < result.error_bound <= 3 * STEPS * BATCH * SEQ * 3 / SECURE.scale
    assert np.abs(result.delta_sum - delta_sum).max() <= result.error_bound
    assert abs(result.weight_sum - tokens) <= result.error_bound
    assert result.train_loss == pytest.approx(loss, abs=1e-4)
    assert np.abs(delta_sum).max() > 100 * result.error_bound  # the bound is not vacuous


def test_dropouts_before_and_after_masking_leave_the_survivors_sum(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    # 5 devices: each party's secrets are shared 3-of-5 (its 4 neighbours and itself); with one
    # device gone before masking and one after, every secret still has 3 signing holders.
    theta = _initial_adapter(tokenizer)
    recorder = Recorder()
    cfg = _config(corpus_files, tokenizer_dir, tmp_path, n_workers=5)
    with DevicePool(cfg, transcript=recorder) as pool:
        pids = pool.worker_pids()
        recorder.kill_on("masked_vector", 3, pids[3])  # dies after its vector arrived
        recorder.kill_on("encrypted_share", 4, pids[4])  # dies before masking

        hit = pool.run_window(window=0, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0)
        after = pool.run_window(
            window=1, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0
        )
        alive = sorted(pool.worker_pids())

    assert alive == [0, 1, 2]
    assert recorder.faults.unfired() == []
    assert {e.shard for e in recorder.of(0, "masked_vector")} == {0, 1, 2, 3}
    assert {e.shard for e in recorder.of(0, "survivor_signature")} == {0, 1, 2}
    delta_sum, tokens, _ = _expected_sum(_true_updates(tmp_path, 0, range(4)))
    assert hit.devices == 4 and hit.tokens == tokens
    assert np.abs(hit.delta_sum - delta_sum).max() <= hit.error_bound
    delta_sum, tokens, _ = _expected_sum(_true_updates(tmp_path, 1, range(3)))
    assert after.devices == 3 and after.tokens == tokens
    assert np.abs(after.delta_sum - delta_sum).max() <= after.error_bound


def test_fewer_than_k_min_contributors_is_refused_and_nothing_is_unmasked(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    theta = _initial_adapter(tokenizer)
    recorder = Recorder()
    cfg = _config(corpus_files, tokenizer_dir, tmp_path, n_workers=3, k_min=3, restart=True)
    with DevicePool(cfg, transcript=recorder) as pool:
        recorder.kill_on("encrypted_share", 2, pool.worker_pids()[2])

        with pytest.raises(WindowRefused) as refused:
            pool.run_window(window=0, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0)
        survivors_after_refusal = sorted(pool.worker_pids())
        # The dead device is restarted; the survivors kept their state and go on.
        again = pool.run_window(
            window=1, global_flat=theta, steps=STEPS, inner=None, deadline_s=60.0
        )

    assert refused.value.reason is RefusalReason.TOO_FEW_DEVICES
    assert (refused.value.expected, refused.value.found) == (3, 2)
    assert survivors_after_refusal == [0, 1]
    assert {e.shard for e in recorder.of(0, "masked_vector")} == {0, 1}
    assert not recorder.of(0, "survivor_signature") and not recorder.of(0, "unmasking_shares")
    assert {e.shard for e in recorder.of(0, "window_done")} == {0, 1}
    delta_sum, tokens, _ = _expected_sum(_true_updates(tmp_path, 1, range(3)))
    assert again.devices == 3 and again.tokens == tokens
    assert np.abs(again.delta_sum - delta_sum).max() <= again.error_bound


def _decode(words: np.ndarray) -> np.ndarray:
    return words.view(np.int32).astype(np.float64) / SECURE.scale


def test_agent_receives_no_single_device_update(secure_window: SecureWindow) -> None:
    result, recorder, numel = secure_window.result, secure_window.recorder, secure_window.numel
    unit = STEPS * BATCH * SEQ
    weighted = {s: u.tokens / unit * u.delta for s, u in secure_window.updates.items()}

    kinds = {e.kind for e in recorder.entries}
    masked = {e.shard: np.frombuffer(e.payload, dtype=np.uint32) for e in recorder.entries
              if e.kind == "masked_vector"}  # fmt: skip

    assert kinds == KEY_MATERIAL | {"masked_vector", "window_done"}
    assert all(len(e.payload) <= 512 for e in recorder.entries if e.kind in KEY_MATERIAL)
    assert sorted(masked) == [0, 1, 2]
    # No received vector, nor the sum of any proper subset of them, correlates with a
    # device's weighted update.
    for size in (1, 2):
        for subset in itertools.combinations(sorted(masked), size):
            words = np.zeros(numel + 2, dtype=np.uint32)
            for s in subset:
                words += masked[s]  # mod 2^32, as the aggregator adds
            decoded = _decode(words)[:numel]
            for shard, update in weighted.items():
                corr = np.corrcoef(decoded, update)[0, 1]
                assert abs(corr) < 0.1, (subset, shard, corr)
    # Only the unmasked sum of all of them is the sum of the weighted updates.
    expected = sum(weighted.values())
    assert np.abs(result.delta_sum / unit - expected).max() <= result.error_bound / unit
    assert np.corrcoef(result.delta_sum, expected)[0, 1] > 0.999
