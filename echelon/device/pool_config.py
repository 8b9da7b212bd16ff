"""Configuration of a boundary's device pool and the result of one of its windows (the
pool itself is in `pool.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from echelon.device.control import Partition
from echelon.secagg import SecAggConfig
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model_config import LoraConfig, ModelConfig

#: Default public seed of the level-1 neighbour graph (irrelevant up to
#: `SecAggConfig.complete_graph_max` devices, where the graph is complete).
LEVEL1_GRAPH_SEED = b"echelon/secagg/level-1"


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """One boundary's devices. `backend` picks the workers' compute device ("gloo": CPU,
    "nccl": CUDA required, "auto": CUDA when present); the agent/worker exchange always runs
    on gloo, since NCCL cannot include the CPU-only agent.

    Level-1 secure aggregation: `secure` None keeps the float path (the baseline, level 1
    off); a `SecAggConfig` (see `device_secagg_config`) makes the workers mask their updates
    so the agent unmasks only their sum, and only over at least `k_min` devices (refused
    below, `WindowRefused`). `k_min` applies to level 1 only (the agent's export policy
    applies its own). A worker's weight is `w = tokens / token_unit`, which must stay within
    `secure.max_weight`; `token_unit` None means one full window of one worker
    (`steps * batch_size * seq_len`), so `w <= 1`. Clipping is per coordinate of the
    unweighted delta at `secure.clip` (LoRA deltas are small: 1.0 by default).
    Up to `secure.complete_graph_max` devices the graph is complete and, with the default
    `threshold_fraction` 0.5, a window of n devices survives `ceil(n / 2) - 1` dropouts
    after its key exchange (before or after masking); beyond that it is refused.
    `graph_seed` is the public seed of the neighbour graph (declare it with the run).
    `eval_every` N: after every N-th window one worker evaluates the boundary's adapter on
    held-out text while the agent syncs (the next window starts once it is done); 0: only
    when asked (`DevicePool.evaluate`).
    `record_updates` is for tests only: each worker also writes its true update to its
    `work_dir` (`update-w{window}-s{shard}.npz`)."""

    n_workers: int
    data: DataConfig
    tokenizer_dir: Path
    work_dir: Path
    partition: Partition = "iid"
    dirichlet_alpha: float = 0.5
    model_cfg: ModelConfig = field(default_factory=ModelConfig)
    lora_cfg: LoraConfig = field(default_factory=LoraConfig)
    inner_cfg: InnerConfig = field(default_factory=InnerConfig)
    threads_per_worker: int = 1
    collective_timeout_s: float = 30.0
    start_timeout_s: float = 300.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    restart_dead_workers: bool = False
    eval_every: int = 1
    eval_batches: int = 8
    eval_batch_size: int = 8
    eval_timeout_s: float = 120.0
    secure: SecAggConfig | None = None
    k_min: int = 2
    token_unit: float | None = None
    graph_seed: bytes = LEVEL1_GRAPH_SEED
    record_updates: bool = False

    def __post_init__(self) -> None:
        if self.n_workers < 1:
            raise ValueError(f"PoolConfig.n_workers: got {self.n_workers}, want >= 1")
        if self.threads_per_worker < 1:
            raise ValueError(
                f"PoolConfig.threads_per_worker: got {self.threads_per_worker}, want >= 1"
            )
        if self.collective_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError("PoolConfig: collective_timeout_s and start_timeout_s must be > 0")
        if self.inner_cfg.seq_len > self.data.seq_len:
            raise ValueError(
                f"PoolConfig.inner_cfg.seq_len: got {self.inner_cfg.seq_len}, want <= "
                f"data.seq_len={self.data.seq_len} (blocks are cut at data.seq_len)"
            )
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("PoolConfig.backend: 'nccl' needs CUDA; use 'auto' or 'gloo'")
        if self.eval_every < 0:
            raise ValueError(
                f"PoolConfig.eval_every: got {self.eval_every}, want >= 0 (0: only on request)"
            )
        if self.eval_batches < 1 or self.eval_batch_size < 1:
            raise ValueError("PoolConfig: eval_batches and eval_batch_size must be >= 1")
        if self.k_min < 1:
            raise ValueError(f"PoolConfig.k_min: got {self.k_min}, want >= 1")
        if self.token_unit is not None and not (
            math.isfinite(self.token_unit) and self.token_unit > 0
        ):
            raise ValueError(f"PoolConfig.token_unit: got {self.token_unit}, want None or > 0")
        if self.secure is not None:
            if self.secure.max_participants < self.n_workers:
                raise ValueError(
                    f"PoolConfig.secure.max_participants: got {self.secure.max_participants}, "
                    f"want >= n_workers={self.n_workers}"
                )
            if self.token_unit is None and self.secure.max_weight < 1.0:
                raise ValueError(
                    f"PoolConfig.secure.max_weight: got {self.secure.max_weight}, want >= 1 "
                    "when token_unit is None (a full window weighs 1); or set token_unit"
                )


@dataclass(frozen=True)
class DeviceWindowResult:
    """The boundary's sum for one window: `delta_sum = sum_i w_i * (theta_v - theta_i)` with
    `w_i = tokens_i`; `weight_sum = sum_i w_i = tokens`; `train_loss` token-weighted.
    With level 1 on, each coordinate of `delta_sum` is within `error_bound` of the sum of the
    clipped deltas (fixed-point quantization), and `weight_sum` within
    `error_bound`; with level 1 off, `error_bound` is 0."""

    delta_sum: np.ndarray
    weight_sum: float
    tokens: int
    devices: int
    train_loss: float
    error_bound: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    """Held-out loss (nats per token) of an adapter on this boundary's validation text;
    `window` is the window whose result was evaluated (-1: an adapter given directly)."""

    window: int
    loss: float
    seconds: float
