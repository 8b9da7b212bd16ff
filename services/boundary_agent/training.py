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

from echelon.controller import relative_drift
from echelon.declaration import RunDeclaration
from echelon.device.pool import DevicePool, PoolConfig
from echelon.device.secure import device_secagg_config
from echelon.secagg import SecAggConfig
from echelon.training.adapter import AdapterLayout, flatten
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, ModelConfig, base_digest, build_model, lora_state
from echelon.training.tokenizer import TokenizerConfig, obtain_tokenizer, tokenizer_digest

from . import metrics
from .runtime import TrainedDelta, WindowSpec

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

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"[devices].workers: got {self.workers}, want >= 1")
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


def start_pool(
    setup: TrainingSetup, facts: ModelFacts, work_dir: Path, security: DeviceSecurity
) -> DevicePool:
    dev = setup.devices
    pool = DevicePool(
        PoolConfig(
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
            secure=security.secure,
            k_min=security.k_min,
            graph_seed=security.graph_seed or b"echelon/secagg/level-1",
        )
    )
    pool.start()
    metrics.WORKERS.set(pool.alive_workers())
    return pool


class PoolTrainer:
    """The runtime's Trainer over a DevicePool: H steps, then the token-weighted delta.

    The pool starts once the run's declared configuration is known (after registration);
    a window that opens before then waits for it. A window whose device sum is refused
    (`WindowRefused`: fewer than k_min devices, or too few to unmask) yields no delta.
    """

    def __init__(self, inner: InnerConfig, start_timeout_s: float = 600.0) -> None:
        self.inner = inner
        self._pool: DevicePool | None = None
        self._ready = threading.Event()
        self._start_timeout_s = start_timeout_s

    def attach(self, pool: DevicePool) -> None:
        self._pool = pool
        self._ready.set()

    def alive_workers(self) -> int:
        return 0 if self._pool is None else self._pool.alive_workers()

    def __call__(self, theta: np.ndarray, version: int, spec: WindowSpec) -> TrainedDelta:
        if not self._ready.wait(self._start_timeout_s) or self._pool is None:
            raise TimeoutError("the device pool did not start")
        pool = self._pool
        inner = dataclasses.replace(self.inner, lr=spec.lr, mu=spec.mu)
        started = time.monotonic()
        metrics.INNER_STEPS.set(spec.inner_steps)
        result = pool.run_window(
            window=spec.window,
            global_flat=theta,
            steps=spec.inner_steps,
            inner=inner,
            deadline_s=max(1.0, spec.deadline_unix_s - time.time()),
        )
        elapsed = time.monotonic() - started
        metrics.WORKERS.set(pool.alive_workers())
        metrics.INNER_SECONDS.observe(elapsed)
        metrics.TOKENS_PER_S.set(result.tokens / max(elapsed, 1e-9))
        metrics.TRAIN_LOSS.set(result.train_loss)
        delta = (result.delta_sum / result.weight_sum).astype(np.float32)
        val = float("nan") if result.val_loss is None else float(result.val_loss)
        if result.val_loss is not None:
            metrics.VAL_LOSS.set(val)
        return TrainedDelta(
            delta=delta,
            base_version=version,
            tokens=result.tokens,
            devices=result.devices,
            train_loss=result.train_loss,
            val_loss=val,
            drift=relative_drift(delta, theta),
        )
