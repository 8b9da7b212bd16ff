"""Builds what the agent trains with: the shared model identity and the device pool.

The boundary's base model, tokenizer and initial adapter are deterministic given the
run's configuration, so every boundary (and the coordinator's registration check)
agrees on the adapter layout and on version 0 without exchanging any weights.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from echelon.declaration import RunDeclaration
from echelon.device.pool import DevicePool, Evaluation, PoolConfig
from echelon.device.secure import device_secagg_config
from echelon.protocol.events import Rebase, Train, TrainedDelta
from echelon.secagg import SecAggConfig
from echelon.training.adapter import AdapterLayout, flatten
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig, base_digest, build_model, lora_state
from echelon.training.tokenizer import TokenizerConfig, obtain_tokenizer, tokenizer_digest

from . import metrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class DevicesConfig:
    """The boundary's devices: how many workers and how they run."""

    workers: int = 2
    threads_per_worker: int = 1
    collective_timeout_s: float = 30.0
    backend: str = "auto"
    restart_dead_workers: bool = True
    eval_batches: int = 8
    eval_every: int = 1  # windows; 0: only the final version is evaluated

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"[devices].workers: got {self.workers}, want >= 1")
        if self.eval_every < 0:
            raise ValueError(
                f"[devices].eval_every: got {self.eval_every}, want >= 0 (0: only at the end)"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"[devices].backend: got {self.backend!r}, want auto, gloo or nccl")


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)


@dataclass(frozen=True)
class ModelFacts:
    """The boundary's view of the shared model: initial adapter and digests."""

    theta0: np.ndarray
    layout: AdapterLayout
    base_digest: bytes
    tokenizer_digest: bytes
    tokenizer_dir: Path


def initial_model(setup: TrainingSetup, vocab_size: int) -> tuple[Any, AdapterLayout, np.ndarray]:
    """The peft model, its travelling layout and the shared initial adapter theta_0."""
    model, layout = build_model(setup.model, setup.lora, vocab_size)
    return model, layout, flatten(lora_state(model, layout), layout)


def model_facts(setup: TrainingSetup, work_dir: Path) -> ModelFacts:
    tokenizer_dir = work_dir / "tokenizer"
    tokenizer = obtain_tokenizer(setup.tokenizer, tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        tokenizer.save(tokenizer_dir)  # the model directory's own: workers load this copy
    model, layout, theta0 = initial_model(setup, tokenizer.vocab_size)
    return ModelFacts(
        theta0=theta0,
        layout=layout,
        base_digest=bytes.fromhex(base_digest(model)),
        tokenizer_digest=bytes.fromhex(tokenizer_digest(tokenizer)),
        tokenizer_dir=tokenizer_dir,
    )


@dataclass(frozen=True, kw_only=True)
class DeviceSecurity:
    """Level-1 secure aggregation as the run declares it (secure None: off, a baseline)."""

    secure: SecAggConfig | None
    k_min: int
    graph_seed: bytes


def device_security(declaration: RunDeclaration, own_k_min: int, workers: int) -> DeviceSecurity:
    """Level 1 from the run's declaration; k_min is the stricter of the two."""
    sa = declaration.secagg
    k_min = max(sa.k_min, own_k_min)
    if not sa.level1:
        return DeviceSecurity(secure=None, k_min=k_min, graph_seed=b"")
    secure = device_secagg_config(max_devices=max(workers, 2), clip=sa.clip)
    seed = f"{declaration.run_id}/level-1".encode()
    return DeviceSecurity(secure=secure, k_min=k_min, graph_seed=seed)


def pool_config(
    setup: TrainingSetup, facts: ModelFacts, work_dir: Path, security: DeviceSecurity
) -> PoolConfig:
    """The device pool the agent runs (benchmarks build the same pool without the agent)."""
    dev = setup.devices
    return PoolConfig(
        n_workers=dev.workers,
        data=setup.data,
        tokenizer_dir=facts.tokenizer_dir,
        work_dir=work_dir / "workers",
        model_cfg=setup.model,
        lora_cfg=setup.lora,
        inner_cfg=setup.inner,
        threads_per_worker=dev.threads_per_worker,
        collective_timeout_s=dev.collective_timeout_s,
        backend=dev.backend,  # type: ignore[arg-type]
        restart_dead_workers=dev.restart_dead_workers,
        eval_batches=dev.eval_batches,
        eval_every=dev.eval_every,
        secure=security.secure,
        k_min=security.k_min,
        graph_seed=security.graph_seed or b"echelon/secagg/level-1",
    )


def start_pool(
    setup: TrainingSetup, facts: ModelFacts, work_dir: Path, security: DeviceSecurity
) -> DevicePool:
    pool = DevicePool(pool_config(setup, facts, work_dir, security))
    pool.start()
    metrics.EXPECTED_WORKERS.set(setup.devices.workers)
    metrics.WORKER_WATCH.look(pool.worker_pids(), pool.alive_workers())
    return pool


class PoolTrainer:
    """The protocol core's trainer over a DevicePool: runs `Train` commands on the devices
    and reports the level-1 sum as the boundary's delta against the cycle's base.

    Each run starts every device from one theta (the pool's contract). A fresh run starts
    from the global version; a continuing one (Echelon-DA's overlap) from where the last
    run left the boundary, remembered as the snapshot that `rebase` moves onto the next
    version: `theta <- theta_(v+1) + carry * (theta - snapshot)`. Device runs are numbered
    on their own (the pool's level-1 keys are fresh per run).
    """

    def __init__(self, inner: InnerConfig, theta0: np.ndarray) -> None:
        self.inner = inner
        self.theta0 = theta0.astype(np.float32)
        self._pool: DevicePool | None = None
        self._base = self.theta0.copy()  # theta of the cycle's base version
        self._current = self.theta0.copy()  # where the last run left the boundary
        self._snapshot: np.ndarray | None = None
        self._base_version = 0
        self._runs = 0
        self.tokens_total = 0
        self.val_loss = float("nan")
        self.final: tuple[int, float] | None = None  # (version, held-out loss) at the end
        self._evaluated: Evaluation | None = None
        self._lock = threading.Lock()

    def attach(self, pool: DevicePool) -> None:
        self._pool = pool

    def alive_workers(self) -> int:
        return 0 if self._pool is None else self._pool.alive_workers()

    def own_stats(self) -> tuple[int, float]:
        """Tokens trained and the last held-out loss: the boundary's own, never sent."""
        return self.tokens_total, self.val_loss

    def rebase(self, command: Rebase) -> None:
        with self._lock:
            new_base = self.theta0 + command.phi
            snap = self._current if self._snapshot is None else self._snapshot
            moved = (self._current - snap).astype(np.float32)
            self._current = (new_base + np.float32(command.carry) * moved).astype(np.float32)
            self._base = new_base.astype(np.float32)
            self._base_version = command.version
            self._snapshot = None

    def __call__(self, command: Train) -> TrainedDelta:
        pool = self._pool
        if pool is None:
            raise RuntimeError("the device pool is not running")
        with self._lock:
            if command.fresh:
                self._base = (self.theta0 + command.phi).astype(np.float32)
                self._current = self._base.copy()
                self._base_version = command.version
            else:
                self._snapshot = self._current.copy()
            start = self._current.copy()
            self._runs += 1
            run = self._runs
        inner = dataclasses.replace(self.inner, mu=command.mu)
        started = time.monotonic()
        log.info(
            "devices_training",
            run=run,
            version=command.version,
            steps=command.steps,
            fresh=command.fresh,
        )
        metrics.INNER_STEPS.set(command.steps)
        result = pool.run_window(
            window=run, global_flat=start, steps=command.steps, inner=inner, deadline_s=3600.0
        )
        elapsed = time.monotonic() - started
        metrics.WORKER_WATCH.look(pool.worker_pids(), pool.alive_workers())
        metrics.INNER_SECONDS.observe(elapsed)
        metrics.TOKENS.inc(result.tokens)
        metrics.TOKENS_PER_S.set(result.tokens / max(elapsed, 1e-9))
        metrics.TRAIN_LOSS.set(result.train_loss)
        self.tokens_total += result.tokens
        self._note_evaluation(pool.last_evaluation)
        run_delta = (result.delta_sum / max(result.weight_sum, 1e-12)).astype(np.float32)
        with self._lock:
            self._current = (start - run_delta).astype(np.float32)
            delta = (self._base - self._current).astype(np.float32)
            base_version = self._base_version
        return TrainedDelta(
            delta=delta,
            base_version=base_version,
            tokens=result.tokens,
            devices=result.devices,
            train_loss=result.train_loss,
        )

    def evaluate_final(self, version: int, phi: np.ndarray) -> float:
        """Held-out loss of global `version` (the run's last) on this boundary's validation
        text, after any training run still in progress; the boundary's own, never sent.

        Raises:
            RuntimeError: the device pool is not running.
            PoolError: no worker could evaluate.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("the device pool is not running")
        started = time.monotonic()
        loss = pool.evaluate((self.theta0 + phi).astype(np.float32))
        self.final = (version, loss)
        self._set_val_loss(loss)
        log.info(
            "final_evaluation",
            version=version,
            val_loss=round(loss, 4),
            seconds=round(time.monotonic() - started, 3),
        )
        return loss

    def _note_evaluation(self, evaluation: Evaluation | None) -> None:
        """A scheduled evaluation that finished since the last run updates the gauge."""
        if evaluation is None or evaluation is self._evaluated:
            return
        self._evaluated = evaluation
        self._set_val_loss(evaluation.loss)

    def _set_val_loss(self, loss: float) -> None:
        """The boundary's latest held-out loss, on its status and its own metrics endpoint."""
        self.val_loss = loss
        metrics.VAL_LOSS.set(loss)
