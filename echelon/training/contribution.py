"""One worker's per-window contribution and the agent's running sum of them: the single seam
where level-1 secure aggregation plugs in (masked uint32 values carried as int64, summed mod
2^32, replace `encode_contribution` and `ContributionSum`; the transport stays as it is).

Layout of a contribution vector (length `layout.numel + CONTRIBUTION_EXTRA`):
`[w * delta (numel values), w, w * train_loss]` with `w = tokens` and `delta = theta_v - theta`.
The agent only ever adds vectors into the sum; it keeps no worker's vector.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch

from echelon.training.control import PointToPointGroup

CONTRIBUTION_EXTRA = 2
CONTRIBUTION_DTYPE = torch.float64
THETA_TAG = 1
CONTRIBUTION_TAG = 2


def contribution_length(numel: int) -> int:
    return numel + CONTRIBUTION_EXTRA


def encode_contribution(
    theta_v: np.ndarray, theta: np.ndarray, *, tokens: int, train_loss: float
) -> torch.Tensor:
    """Worker side: `[w * (theta_v - theta), w, w * train_loss]` as float64, `w = tokens`.

    Raises:
        ValueError: the vectors differ in shape or `tokens` is not positive.
    """
    if theta_v.shape != theta.shape or theta.ndim != 1:
        raise ValueError(f"contribution: got theta {theta.shape}, want theta_v's {theta_v.shape}")
    if tokens <= 0:
        raise ValueError(f"contribution.tokens: got {tokens}, want > 0")
    w = float(tokens)
    out = np.empty(contribution_length(theta.shape[0]), dtype=np.float64)
    np.subtract(theta_v, theta, out=out[:-CONTRIBUTION_EXTRA], dtype=np.float64)
    out[:-CONTRIBUTION_EXTRA] *= w
    out[-2] = w
    out[-1] = w * float(train_loss)
    return torch.from_numpy(out)


class ContributionSum:
    """Agent side: the running sum of contribution vectors, and how many were added."""

    def __init__(self, numel: int) -> None:
        self._sum = np.zeros(contribution_length(numel), dtype=np.float64)
        self.count = 0

    def add(self, contribution: torch.Tensor) -> None:
        """Add one received vector into the sum (the caller then drops or reuses its buffer).

        Raises:
            ValueError: the vector has the wrong length.
        """
        vec = contribution.numpy()
        if vec.shape != self._sum.shape:
            raise ValueError(f"contribution length: got {vec.shape}, want {self._sum.shape}")
        self._sum += vec
        self.count += 1

    @property
    def delta_sum(self) -> np.ndarray:
        return self._sum[:-CONTRIBUTION_EXTRA].copy()

    @property
    def weight_sum(self) -> float:
        return float(self._sum[-2])

    @property
    def mean_train_loss(self) -> float:
        return float(self._sum[-1] / self._sum[-2]) if self._sum[-2] > 0 else float("nan")


def new_receive_buffer(numel: int) -> torch.Tensor:
    return torch.zeros(contribution_length(numel), dtype=CONTRIBUTION_DTYPE)


def send_contribution(
    group: PointToPointGroup, contribution: torch.Tensor, timeout_s: float
) -> None:
    """Worker side: point-to-point send of the contribution to the agent (rank 0)."""
    group.send([contribution], 0, CONTRIBUTION_TAG).wait(timedelta(seconds=timeout_s))
