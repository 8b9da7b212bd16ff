"""The boundary's export policy: what a boundary delta must satisfy before it may leave.

A delta summed over fewer than `k_min` devices *is* a device update, so it is
refused; so is a delta holding NaN/Inf or of the wrong shape. An accepted delta
is clipped to L2 norm `clip_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ExportRefused(Exception):
    """The policy refused to export a delta; the message says which rule and the values."""


@dataclass(frozen=True, kw_only=True)
class ExportPolicy:
    k_min: int = 2
    clip_norm: float = 10.0

    def __post_init__(self) -> None:
        if self.k_min < 1:
            raise ValueError(f"ExportPolicy.k_min: got {self.k_min}, want >= 1 (default 2)")
        if not self.clip_norm > 0:
            raise ValueError(f"ExportPolicy.clip_norm: got {self.clip_norm}, want > 0")


@dataclass(frozen=True)
class ExportDecision:
    delta: np.ndarray
    norm_before: float
    clipped: bool


def apply_export_policy(
    delta: np.ndarray, *, devices: int, dim: int, policy: ExportPolicy
) -> ExportDecision:
    """Checks and clips a boundary delta. Raises ExportRefused with the rule that failed."""
    if devices < policy.k_min:
        raise ExportRefused(f"devices: got {devices}, want >= k_min = {policy.k_min}")
    if delta.shape != (dim,):
        raise ExportRefused(f"delta shape: got {delta.shape}, want ({dim},)")
    if not np.isfinite(delta).all():
        raise ExportRefused("delta holds NaN or Inf")
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm <= policy.clip_norm:
        return ExportDecision(delta=delta.astype(np.float32), norm_before=norm, clipped=False)
    scaled = (delta * (policy.clip_norm / norm)).astype(np.float32)
    return ExportDecision(delta=scaled, norm_before=norm, clipped=True)
