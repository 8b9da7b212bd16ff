"""The boundary agent's device pool: spawns and supervises one worker process per device, runs
participation windows over a gloo group in which the agent is rank 0, and returns only the
token-weighted SUM of the workers' deltas (never one worker's update or token count).

Per window: a StartWindow control message over each worker's Pipe; with level-1 secure
aggregation on (`PoolConfig.secure`), the key rounds over the Pipes (`secure.py`); theta_v to
each worker point-to-point over gloo; each worker's contribution (see `contribution.py`:
float, or masked) back point-to-point, waited on until the window's deadline; with level 1 on,
the survivor signatures and unmasking shares over the Pipes. A worker that dies or misses the
deadline is dropped (killed), the window completes with the survivors, and the group is
rebuilt on a fresh rendezvous port before the next window.

A refused window (`WindowRefused`: fewer than `k_min` contributors, or too few survivors to
unmask) applies nothing. Each worker keeps what it holds locally (AdamW moments and step
count, persisted in its `work_dir`) and discards its delta: every window starts from the
global adapter the agent sends, so the next window starts from the global version as usual.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
import torch

from echelon.secagg import SecAggConfig
from echelon.training.adapter import AdapterLayout, AdapterLayoutError
from echelon.training.contribution import (
    FloatAggregation,
    Transcript,
    TranscriptEntry,
    WindowAggregation,
    collect_contributions,
    send_global,
)
from echelon.training.control import (
    EvalResult,
    Evaluate,
    Partition,
    StartWindow,
    WindowDone,
    WorkerSpec,
)
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.members import Membership, PoolError, WorkerHandle
from echelon.training.model_config import LoraConfig, ModelConfig
from echelon.training.secure import (
    LEVEL1_GRAPH_SEED,
    RefusalReason,
    SecureAggregation,
    WindowRefused,
    device_secagg_config,
)

log = structlog.get_logger(__name__)

__all__ = [
    "DevicePool",
    "DeviceWindowResult",
    "PoolConfig",
    "PoolError",
    "RefusalReason",
    "TranscriptEntry",
    "WindowRefused",
    "device_secagg_config",
]


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
    `graph_seed` is the public seed of the neighbour graph (declare it with the run).
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
    eval_each_window: bool = True
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
    `w_i = tokens_i`; `weight_sum = sum_i w_i = tokens`; `train_loss` token-weighted;
    `val_loss` of `theta_v - delta_sum / weight_sum` on held-out text (None when not run).
    With level 1 on, each coordinate of `delta_sum` is within `error_bound` of the sum of the
    clipped deltas (fixed-point quantization), and `weight_sum` within
    `error_bound`; with level 1 off, `error_bound` is 0."""

    delta_sum: np.ndarray
    weight_sum: float
    tokens: int
    devices: int
    train_loss: float
    val_loss: float | None
    error_bound: float = 0.0


class DevicePool:
    """Agent side of one boundary's device plane (rank 0 of the workers' gloo group).

    Not thread-safe: one caller drives start, windows, evaluation and close in turn.
    """

    def __init__(self, cfg: PoolConfig, *, transcript: Transcript | None = None) -> None:
        """`transcript`, for tests and audits of the device plane, is called with everything
        the agent process receives from the workers during each window (`TranscriptEntry`)."""
        self.cfg = cfg
        self._transcript = transcript
        self._inner = cfg.inner_cfg
        self._members = Membership(
            self._spec,
            n_workers=cfg.n_workers,
            start_timeout_s=cfg.start_timeout_s,
            collective_timeout_s=cfg.collective_timeout_s,
            restart=cfg.restart_dead_workers,
        )
        self._started = False
        self._closed = False

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the workers, wait until each has loaded its model and shard, build the group.

        Raises:
            PoolError: no worker came up, or the workers disagree on the adapter layout.
        """
        if self._started:
            return
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self._members.start()
        self._started = True
        self._members.require_group()

    def close(self) -> None:
        """Stop the workers (Stop, then terminate, then kill); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._members.close()
        log.info("pool_closed")

    def __enter__(self) -> DevicePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries ----------------------------------------------------------------------
    def layout(self) -> AdapterLayout:
        if self._members.layout is None:
            raise PoolError("DevicePool.layout: call start() first")
        return self._members.layout

    def alive_workers(self) -> int:
        return sum(1 for h in self._members.workers.values() if h.process.is_alive())

    def worker_pids(self) -> dict[int, int]:
        """Shard index -> process id of the live workers (for operators and fault tests)."""
        return {
            s: h.process.pid for s, h in self._members.workers.items() if h.process.pid is not None
        }

    # ---- windows ----------------------------------------------------------------------
    def run_window(
        self,
        *,
        window: int,
        global_flat: np.ndarray,
        steps: int,
        inner: InnerConfig | None,
        deadline_s: float,
    ) -> DeviceWindowResult:
        """Run `steps` inner steps on every live worker from `global_flat` and return the sum
        of their weighted deltas. `deadline_s` is seconds from now; a worker that has not
        delivered by then is dropped.

        Raises:
            AdapterLayoutError: `global_flat` does not match the layout.
            PoolError: the pool is not running or no worker contributed.
        """
        layout = self._check_running()
        if global_flat.shape != (layout.numel,):
            raise AdapterLayoutError(
                "global adapter length", expected=layout.numel, found=global_flat.shape
            )
        if steps < 1 or deadline_s <= 0:
            raise ValueError(f"run_window: got steps={steps}, deadline_s={deadline_s}; want > 0")
        if inner is not None and inner.seq_len > self.cfg.data.seq_len:
            raise ValueError(
                f"run_window.inner.seq_len: got {inner.seq_len}, want <= "
                f"data.seq_len={self.cfg.data.seq_len}"
            )
        deadline = time.monotonic() + deadline_s
        self._members.supervise()
        group = self._members.require_group()
        theta = torch.from_numpy(np.ascontiguousarray(global_flat, dtype=np.float32))
        start = StartWindow(
            window=window,
            steps=steps,
            inner=inner,
            send_timeout_s=deadline_s + self.cfg.collective_timeout_s,
        )
        failed: dict[int, str] = {}
        members = list(self._members.workers.values())
        for handle in members:
            if not self._members.send(handle, start):
                failed[handle.shard] = "control pipe closed"
        ranks = {h.shard: h.rank for h in members if h.shard not in failed}
        failed.update(send_global(group, ranks, theta, self.cfg.collective_timeout_s))
        ranks = {shard: rank for shard, rank in ranks.items() if shard not in failed}
        total, lost = collect_contributions(group, ranks, layout.numel, deadline)
        failed.update(lost)
        for handle in members:
            if handle.shard not in failed:
                reply = self._members.await_reply(handle, WindowDone, self.cfg.collective_timeout_s)
                if reply is None or reply.window != window:
                    failed[handle.shard] = "no WindowDone"
        for shard, reason in failed.items():
            self._members.drop(shard, reason, window=window)
        if total.count == 0:
            raise PoolError(f"window {window}: no worker contributed ({failed})")
        val_loss = None
        if self.cfg.eval_each_window:
            local = global_flat.astype(np.float64) - total.delta_sum / total.weight_sum
            val_loss = self._evaluate_or_none(local.astype(np.float32), window)
        result = DeviceWindowResult(
            delta_sum=total.delta_sum,
            weight_sum=total.weight_sum,
            tokens=round(total.weight_sum),
            devices=total.count,
            train_loss=total.mean_train_loss,
            val_loss=val_loss,
        )
        log.info(
            "pool_window_done",
            window=window,
            devices=result.devices,
            tokens=result.tokens,
            train_loss=round(result.train_loss, 4),
            val_loss=val_loss,
            dropped=len(failed),
        )
        return result

    def evaluate(self, global_flat: np.ndarray) -> float:
        """Validation loss of this boundary's held-out text under the adapter `global_flat`
        (computed in a worker, so the agent never loads the model).

        Raises:
            AdapterLayoutError: `global_flat` does not match the layout.
            PoolError: no worker could evaluate.
        """
        layout = self._check_running()
        if global_flat.shape != (layout.numel,):
            raise AdapterLayoutError(
                "adapter length", expected=layout.numel, found=global_flat.shape
            )
        msg = Evaluate(theta=np.ascontiguousarray(global_flat, dtype=np.float32))
        for shard in sorted(self._members.workers):
            handle = self._members.workers[shard]
            if self._members.send(handle, msg):
                reply = self._members.await_reply(handle, EvalResult, self.cfg.eval_timeout_s)
                if reply is not None:
                    return reply.loss
            self._members.drop(shard, "evaluation failed")
        raise PoolError("evaluate: no live worker")

    # ---- internals ----------------------------------------------------------------------
    def _spec(self, shard: int) -> WorkerSpec:
        use_cuda = self.cfg.backend == "nccl" or (
            self.cfg.backend == "auto" and torch.cuda.is_available()
        )
        device = f"cuda:{shard % torch.cuda.device_count()}" if use_cuda else "cpu"
        return WorkerSpec(
            shard=shard,
            n_shards=self.cfg.n_workers,
            data=self.cfg.data,
            partition=self.cfg.partition,
            dirichlet_alpha=self.cfg.dirichlet_alpha,
            model_cfg=self.cfg.model_cfg,
            lora_cfg=self.cfg.lora_cfg,
            inner_cfg=self.cfg.inner_cfg,
            tokenizer_dir=self.cfg.tokenizer_dir,
            threads=self.cfg.threads_per_worker,
            device=device,
            work_dir=self.cfg.work_dir,
            eval_batches=self.cfg.eval_batches,
            eval_batch_size=self.cfg.eval_batch_size,
        )

    def _check_running(self) -> AdapterLayout:
        if self._closed:
            raise PoolError("the pool is closed")
        if not self._started:
            raise PoolError("call start() first")
        return self.layout()

    def _evaluate_or_none(self, theta: np.ndarray, window: int) -> float | None:
        try:
            return self.evaluate(theta)
        except PoolError as exc:
            log.warning("pool_eval_failed", window=window, error=str(exc))
            return None
