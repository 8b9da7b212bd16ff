"""One worker's per-window contribution and the agent's running sum of them: the single seam
where level-1 secure aggregation plugs in (masked uint32 values carried as int64, summed mod
2^32, replace `encode_contribution` and `ContributionSum`; the transport stays as it is).

Layout of a contribution vector (length `layout.numel + CONTRIBUTION_EXTRA`):
`[w * delta (numel values), w, w * train_loss]` with `w = tokens` and `delta = theta_v - theta`.
The agent only ever adds vectors into the sum; it keeps no worker's vector.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import timedelta

import numpy as np
import torch

from echelon.training.control import PointToPointGroup

CONTRIBUTION_EXTRA = 2
CONTRIBUTION_DTYPE = torch.float64
THETA_TAG = 1
CONTRIBUTION_TAG = 2
# A receive that already landed still needs a positive wait to be collected.
_MIN_WAIT_S = 0.05


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


def send_global(
    group: PointToPointGroup, ranks: Mapping[int, int], theta: torch.Tensor, timeout_s: float
) -> dict[int, str]:
    """Agent side: theta_v to every worker point-to-point (sends posted together, then
    waited on). Returns the workers (shard -> reason) that could not be reached."""
    failed: dict[int, str] = {}
    sends = {shard: group.send([theta], rank, THETA_TAG) for shard, rank in ranks.items()}
    for shard, work in sends.items():
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            failed[shard] = f"theta send: {exc}"
    return failed


def collect_contributions(
    group: PointToPointGroup, ranks: Mapping[int, int], numel: int, deadline: float
) -> tuple[ContributionSum, dict[int, str]]:
    """Agent side: one point-to-point receive per worker, all posted up front, each waited on
    until `deadline` (a `time.monotonic()` value) and added into the sum as it lands; each
    buffer is zeroed right after, so no single worker's vector outlives this call. A dead
    peer fails its receive at once; a slow one fails at the deadline; neither blocks the
    others. Returns the sum and the workers (shard -> reason) that did not contribute."""
    total = ContributionSum(numel)
    failed: dict[int, str] = {}
    receives = {}
    for shard, rank in ranks.items():
        buffer = new_receive_buffer(numel)
        receives[shard] = (group.recv([buffer], rank, CONTRIBUTION_TAG), buffer)
    for shard, (work, buffer) in receives.items():
        try:
            work.wait(timedelta(seconds=max(_MIN_WAIT_S, deadline - time.monotonic())))
            total.add(buffer)
        except RuntimeError as exc:
            failed[shard] = f"contribution: {exc}"
        buffer.zero_()
    return total, failed
