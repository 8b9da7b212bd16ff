"""One worker's per-window contribution and the agent's side of collecting it: the single seam
between the window loop (`pool.py`) and how contributions are combined.

A `WindowAggregation` is either the float sum (`FloatAggregation`, level 1 off: the baseline)
or level-1 secure aggregation (`secure.SecureAggregation`: masked uint32 vectors, sent as the
same bytes viewed as int32, summed mod 2^32 by the library's `Aggregator`). Both receive one
vector of `contribution_length(numel)` values per worker, as one frame on its control pipe,
into a `ContributionSink`, and both end in the same `WindowTotals`; theta_v goes out to the
workers over gloo point-to-point.

Float layout (length `numel + CONTRIBUTION_EXTRA`): `[w * delta (numel values), w,
w * train_loss]` with `w = tokens` and `delta = theta_v - theta`. The agent only ever adds
vectors into the sum; it keeps no worker's vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Protocol

import numpy as np
import torch

from echelon.device.control import SecureStart
from echelon.device.group import PointToPointGroup
from echelon.device.handle import WorkerHandle

CONTRIBUTION_EXTRA = 2
CONTRIBUTION_DTYPE = torch.float64
THETA_TAG = 1


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


def send_contribution(conn: Connection, contribution: torch.Tensor) -> None:
    """Worker side: the contribution's raw bytes as one frame on the worker's control pipe
    (its length is the frame's, so the agent checks it before it reads a byte)."""
    conn.send_bytes(contribution.contiguous().numpy().data)


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
    handles: Sequence[WorkerHandle],
    sink: ContributionSink,
    deadline: float,
    record: Callable[[int, str, bytes], None] | None = None,
) -> dict[int, str]:
    """Agent side: each worker's contribution frame from its control pipe, taken as it lands
    until `deadline` (a `time.monotonic()` value), copied into a buffer of the sink's layout
    and handed to `sink` (and to `record`, the transcript hook, when set); the buffer is
    zeroed right after. A frame longer than the layout is refused from its header, before
    its bytes are read; a shorter one by its length. A dead worker fails at once, a slow one
    at the deadline; neither blocks the others. Returns the workers (shard -> reason) that
    did not contribute (their pipes are out of step: the pool drops them).

    The vectors do not travel over gloo: a gloo receive takes a shorter message silently
    (the rest of the buffer stays as it was) and aborts the whole process on a longer one.
    """
    failed: dict[int, str] = {}
    waiting = {h.conn: h for h in handles}
    buffer = sink.new_buffer()
    expected = buffer.numel() * buffer.element_size()
    view = buffer.numpy().view(np.uint8)
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for handle in waiting.values():
                failed[handle.shard] = "contribution: none before the window's deadline"
            break
        for conn in wait(list(waiting), timeout=remaining):
            handle = waiting.pop(conn)  # type: ignore[call-overload]
            try:
                frame = handle.conn.recv_bytes(expected)
            except OSError as exc:  # a longer frame ("bad message length")
                failed[handle.shard] = f"contribution: {exc}, want {expected} bytes"
                continue
            except EOFError:
                failed[handle.shard] = f"contribution: worker gone (exit {handle.process.exitcode})"
                continue
            try:
                if len(frame) != expected:
                    raise ContributionRejected(
                        f"contribution of worker {handle.shard}: got {len(frame)} bytes, "
                        f"want {expected} ({sink.kind})"
                    )
                view[:] = np.frombuffer(frame, dtype=np.uint8)
                del frame
                if record is not None:
                    record(handle.shard, sink.kind, view.tobytes())
                sink.add(handle.shard, buffer)
            except ContributionRejected as exc:
                failed[handle.shard] = str(exc)
            buffer.zero_()
    return failed
