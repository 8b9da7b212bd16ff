"""One worker's per-window contribution and the agent's side of collecting it: the single seam
between the window loop (`pool.py`) and how contributions are combined.

A `WindowAggregation` is either the float sum (`FloatAggregation`, level 1 off: the baseline)
or level-1 secure aggregation (`secure.SecureAggregation`: masked uint32 vectors, sent as the
same bytes viewed as int32 over gloo point-to-point, summed mod 2^32 by the library's
`Aggregator`). Both receive one vector of `contribution_length(numel)` values per worker into
a `ContributionSink`, and both end in the same `WindowTotals`.

Float layout (length `numel + CONTRIBUTION_EXTRA`): `[w * delta (numel values), w,
w * train_loss]` with `w = tokens` and `delta = theta_v - theta`. The agent only ever adds
vectors into the sum; it keeps no worker's vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import numpy as np
import torch

from echelon.device.control import SecureStart
from echelon.device.group import PointToPointGroup
from echelon.device.handle import WorkerHandle

CONTRIBUTION_EXTRA = 2
CONTRIBUTION_DTYPE = torch.float64
THETA_TAG = 1
CONTRIBUTION_TAG = 2
# A receive that already landed still needs a positive wait to be collected.
_MIN_WAIT_S = 0.05


def contribution_length(numel: int) -> int:
    return numel + CONTRIBUTION_EXTRA


@dataclass(frozen=True, kw_only=True)
class TranscriptEntry:
    """One thing the agent process received from a worker in a window: `kind` names it
    (`advertisement`, `encrypted_share`, `masked_vector`, `survivor_signature`,
    `unmasking_shares`, `contribution` for the float path, `window_done`), `payload` is the
    exact bytes received (the library's fixed layouts, or the raw vector buffer)."""

    window: int
    shard: int
    kind: str
    payload: bytes


Transcript = Callable[[TranscriptEntry], None]


class ContributionRejected(Exception):
    """A received contribution does not fit the window (wrong length, not accepted by the
    aggregator); the worker counts as not having contributed."""


@dataclass(frozen=True, kw_only=True)
class WindowTotals:
    """What a window's aggregation yields, in the units of `DeviceWindowResult`:
    `delta_sum = sum_i tokens_i * delta_i`, `weight_sum = sum_i tokens_i`, the token-weighted
    train loss, and the contributing devices. `error_bound` is the worst-case absolute error
    of one `delta_sum` coordinate (0 for the float path)."""

    delta_sum: np.ndarray
    weight_sum: float
    train_loss: float
    devices: int
    error_bound: float


class ContributionSink(Protocol):
    """Where received contribution vectors go, one per worker, in arrival order."""

    kind: str

    def new_buffer(self) -> torch.Tensor: ...

    def add(self, shard: int, buffer: torch.Tensor) -> None: ...


class WindowAggregation(Protocol):
    """How one window's contributions are combined: the float sum or level-1 secure
    aggregation. The pool calls `open` after StartWindow (before theta_v is sent), feeds
    `sink`, then calls `close`; either may raise `WindowRefused`, after which the pool calls
    `abort`. Workers that fail a step are added to `failed` (shard -> reason)."""

    @property
    def sink(self) -> ContributionSink: ...

    def start_info(self) -> SecureStart | None: ...

    def open(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> None: ...

    def close(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> WindowTotals: ...

    def abort(self, handles: Sequence[WorkerHandle], reason: str) -> None: ...


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
    """Agent side of the float path: the running sum of contribution vectors."""

    kind = "contribution"

    def __init__(self, numel: int) -> None:
        self._numel = numel
        self._sum = np.zeros(contribution_length(numel), dtype=np.float64)
        self.count = 0

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros(contribution_length(self._numel), dtype=CONTRIBUTION_DTYPE)

    def add(self, shard: int, buffer: torch.Tensor) -> None:
        """Add one received vector into the sum (the caller then zeroes its buffer).

        Raises:
            ContributionRejected: the vector has the wrong length or dtype.
        """
        vec = buffer.numpy()
        if vec.shape != self._sum.shape or vec.dtype != np.float64:
            raise ContributionRejected(
                f"contribution of worker {shard}: got {vec.dtype} {vec.shape}, "
                f"want float64 {self._sum.shape}"
            )
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


class FloatAggregation:
    """Level 1 off (the baseline): workers send float64 contributions in the clear and the
    agent adds them up. Never refuses; an empty sum is the pool's `PoolError`."""

    def __init__(self, numel: int) -> None:
        self.sink = ContributionSum(numel)

    def start_info(self) -> SecureStart | None:
        return None

    def open(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> None:
        return None

    def close(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> WindowTotals:
        total = self.sink
        return WindowTotals(
            delta_sum=total.delta_sum,
            weight_sum=total.weight_sum,
            train_loss=total.mean_train_loss,
            devices=total.count,
            error_bound=0.0,
        )

    def abort(self, handles: Sequence[WorkerHandle], reason: str) -> None:
        return None


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
    sends = {}
    for shard, rank in ranks.items():
        try:
            sends[shard] = group.send([theta], rank, THETA_TAG)
        except RuntimeError as exc:  # gloo refuses to post to a peer already gone
            failed[shard] = f"theta send: {exc}"
    for shard, work in sends.items():
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            failed[shard] = f"theta send: {exc}"
    return failed


def collect_contributions(
    group: PointToPointGroup,
    ranks: Mapping[int, int],
    sink: ContributionSink,
    deadline: float,
    record: Callable[[int, str, bytes], None] | None = None,
) -> dict[int, str]:
    """Agent side: one point-to-point receive per worker, all posted up front, each waited on
    until `deadline` (a `time.monotonic()` value) and handed to `sink` as it lands (and to
    `record`, the transcript hook, when set); each buffer is zeroed right after, so no
    received vector outlives this call. A dead peer fails its receive at once; a slow one
    fails at the deadline; neither blocks the others. Returns the workers (shard -> reason)
    that did not contribute."""
    failed: dict[int, str] = {}
    receives = {}
    for shard, rank in ranks.items():
        buffer = sink.new_buffer()
        try:
            receives[shard] = (group.recv([buffer], rank, CONTRIBUTION_TAG), buffer)
        except RuntimeError as exc:  # gloo refuses to post to a peer already gone
            failed[shard] = f"contribution: {exc}"
    for shard, (work, buffer) in receives.items():
        try:
            work.wait(timedelta(seconds=max(_MIN_WAIT_S, deadline - time.monotonic())))
            if record is not None:
                record(shard, sink.kind, buffer.numpy().tobytes())
            sink.add(shard, buffer)
        except RuntimeError as exc:
            failed[shard] = f"contribution: {exc}"
        except ContributionRejected as exc:
            failed[shard] = str(exc)
        buffer.zero_()
    return failed
