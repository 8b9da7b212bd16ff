"""The DiLoCo outer optimizer: Nesterov momentum SGD on the averaged pseudo-gradient.

The pseudo-gradient of a window is g = sum_b w_b delta_b / sum_b w_b with
delta_b = theta_v - theta_b, so a plain SGD step with lr 1 and no momentum is
FedAvg. State (the momentum buffer) is a flat float32 vector that the coordinator
persists beside each global version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    """Outer learning rate and momentum; DiLoCo uses lr 0.7, momentum 0.9, Nesterov."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.lr <= 10.0:
            raise ValueError(f"OuterConfig.lr: got {self.lr}, want 0 < lr <= 10 (DiLoCo: 0.7)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OuterConfig.momentum: got {self.momentum}, want 0 <= m < 1")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("OuterConfig.nesterov needs momentum > 0; set nesterov = false")


class OuterOptimizer:
    """Applies outer steps in place of torch.optim.SGD, on flat numpy vectors."""

    def __init__(self, config: OuterConfig, dim: int, momentum: np.ndarray | None = None) -> None:
        if momentum is not None and momentum.shape != (dim,):
            raise ValueError(f"momentum buffer shape: got {momentum.shape}, want ({dim},)")
        self.config = config
        self.dim = dim
        self.momentum = (
            np.zeros(dim, dtype=np.float32) if momentum is None else momentum.astype(np.float32)
        )

    def step(self, theta: np.ndarray, pseudo_gradient: np.ndarray) -> np.ndarray:
        """Returns theta after one outer step; raises ValueError on a shape mismatch or NaN."""
        if theta.shape != (self.dim,) or pseudo_gradient.shape != (self.dim,):
            raise ValueError(
                f"outer step shapes: got theta {theta.shape}, g {pseudo_gradient.shape}, "
                f"want ({self.dim},)"
            )
        g = pseudo_gradient.astype(np.float32, copy=False)
        if not np.isfinite(g).all():
            raise ValueError("outer step: pseudo-gradient holds NaN or Inf")
        cfg = self.config
        if cfg.momentum == 0.0:
            update = g
        else:
            self.momentum *= np.float32(cfg.momentum)
            self.momentum += g
            update = g + np.float32(cfg.momentum) * self.momentum if cfg.nesterov else self.momentum
        return (theta.astype(np.float32) - np.float32(cfg.lr) * update).astype(np.float32)
