"""The inner loop of one device: AdamW on the LoRA parameters with a proximal pull towards the
window's global adapter, gradient clipping, warm-up + cosine schedule, bf16 autocast on CUDA;
and validation loss."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from echelon.training.adapter import AdapterLayout, unflatten

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    """Inner optimizer and batch shape. `total_steps` is the cosine schedule's length in inner
    steps over the whole run (windows included); `mu` weights the proximal term."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 10
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    mu: float = 0.0
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"InnerConfig.lr: got {self.lr}, want > 0")
        if self.weight_decay < 0 or self.mu < 0:
            raise ValueError("InnerConfig: weight_decay and mu must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"InnerConfig.betas: got {self.betas}, want each in [0, 1)")
        if self.grad_clip <= 0:
            raise ValueError(f"InnerConfig.grad_clip: got {self.grad_clip}, want > 0")
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"InnerConfig: got warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}; want 0 <= warmup_steps < total_steps"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"InnerConfig.min_lr_ratio: got {self.min_lr_ratio}, want in [0, 1]")
        if self.batch_size <= 0 or self.seq_len < 2:
            raise ValueError("InnerConfig: want batch_size >= 1 and seq_len >= 2")


def lr_at(step: int, cfg: InnerConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class InnerResult:
    """What one call of `InnerLoop.run` did: input tokens consumed and mean CE train loss."""

    tokens: int
    mean_loss: float
    steps: int


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


class InnerLoop:
    """Runs inner steps on one model; the AdamW state and the step count persist across
    windows (they never leave the worker, except to its own `work_dir`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layout: AdapterLayout,
        cfg: InnerConfig,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        named = dict(model.named_parameters())
        self.params: list[torch.nn.Parameter] = [named[name] for name in layout.names]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.step = 0

    def set_config(self, cfg: InnerConfig) -> None:
        """Take new hyperparameters for the next window (the optimizer state is kept)."""
        self.cfg = cfg
        for group in self.optimizer.param_groups:
            group["betas"] = cfg.betas
            group["weight_decay"] = cfg.weight_decay

    def set_adapter(self, theta: np.ndarray) -> None:
        """Load a flat adapter into the travelling parameters."""
        state = unflatten(theta, self.layout)
        with torch.no_grad():
            for name, param in zip(self.layout.names, self.params, strict=True):
                param.copy_(state[name].to(param.device, param.dtype))

    def adapter(self) -> np.ndarray:
        """The current travelling parameters as one float32 vector (layout order)."""
        with torch.no_grad():
            return torch.cat([p.detach().float().reshape(-1).cpu() for p in self.params]).numpy()

    def run(self, theta_v: np.ndarray, batches: Iterator[torch.Tensor], steps: int) -> InnerResult:
        """Start from `theta_v`, run `steps` steps of CE + mu/2 * ||theta - theta_v||^2."""
        if steps <= 0:
            raise ValueError(f"InnerLoop.run.steps: got {steps}, want > 0")
        self.set_adapter(theta_v)
        anchor = [p.detach().clone() for p in self.params] if self.cfg.mu > 0 else []
        self.model.train()
        tokens = 0
        # Summed on the device: reading each step's loss would wait for the GPU every step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(steps):
            batch = next(batches).to(self.device, non_blocking=True)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.cfg)
            with _autocast(self.device):
                ce = self.model(input_ids=batch, labels=batch).loss
            loss = ce.float()
            if anchor:
                prox = sum(
                    ((p.float() - a.float()) ** 2).sum()
                    for p, a in zip(self.params, anchor, strict=True)
                )
                loss = loss + 0.5 * self.cfg.mu * prox
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            tokens += int(batch.numel())
            loss_sum += ce.detach().double()
        mean_loss = float(loss_sum) / steps
        log.debug("inner_steps_done", steps=steps, tokens=tokens, loss=mean_loss, step=self.step)
        return InnerResult(tokens=tokens, mean_loss=mean_loss, steps=steps)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val_batches: Iterable[torch.Tensor], device: torch.device | None = None
) -> float:
    """Mean CE loss per predicted token over `val_batches`.

    Raises:
        ValueError: `val_batches` is empty.
    """
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for batch in val_batches:
            batch = batch.to(device)
            with _autocast(device):
                loss = model(input_ids=batch, labels=batch).loss
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss.float()) * predicted
            count += predicted
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: no validation batches; want a non-empty held-out split")
    return total / count
