"""The simulated WAN and fault schedules: per-link latency and bandwidth, the byte size of
every payload that crosses a boundary, device churn, boundary outages and partitions.

All functions are pure; times are seconds on the simulator's virtual clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The O(1) metadata of one contribution: tokens, staleness, drift, loss, weight, norms.
METADATA_BYTES = 64
#: A control message (open window with the cohort, acknowledgment).
CONTROL_BYTES = 256


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """One boundary's link to the global plane: one-way latency and bandwidth."""

    latency_s: float = 0.05
    bandwidth_mbps: float = 20.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"LinkConfig.latency_s: got {self.latency_s}, want >= 0")
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"LinkConfig.bandwidth_mbps: got {self.bandwidth_mbps}, want > 0")

    def transfer_s(self, nbytes: int) -> float:
        """One message of `nbytes` across the link: latency plus serialisation."""
        return self.latency_s + nbytes * 8.0 / (self.bandwidth_mbps * 1e6)

    def round_trip_s(self, up_bytes: int, down_bytes: int) -> float:
        return self.transfer_s(up_bytes) + self.transfer_s(down_bytes)


def vector_bytes(dim: int) -> int:
    """A boundary contribution: d + 1 values of 4 bytes (masked uint32 or plain float32)."""
    return (dim + 1) * 4 + METADATA_BYTES


def adapter_bytes(dim: int) -> int:
    """The global adapter sent to a boundary: d float32 values and a version header."""
    return dim * 4 + METADATA_BYTES


@dataclass(frozen=True, kw_only=True)
class Interval:
    """Boundary `boundary` is affected from `start_s` to `end_s`."""

    boundary: int
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if self.boundary < 0 or not 0 <= self.start_s < self.end_s:
            raise ValueError(f"Interval: got {self}, want boundary >= 0, 0 <= start_s < end_s")


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Device churn (probability a device sits out one training cycle), boundary outages
    (down: no compute, unreachable) and partitions (unreachable, compute goes on)."""

    churn: float = 0.0
    outages: tuple[Interval, ...] = ()
    partitions: tuple[Interval, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.churn < 1.0:
            raise ValueError(f"FaultConfig.churn: got {self.churn}, want in [0, 1)")
        # TOML gives tables; keep the field typed as intervals.
        for name in ("outages", "partitions"):
            items = tuple(
                i if isinstance(i, Interval) else Interval(**dict(i)) for i in getattr(self, name)
            )
            object.__setattr__(self, name, items)


def device_present(seed: int, boundary: int, device: int, cycle: int, churn: float) -> bool:
    """Whether a device takes part in a boundary's training cycle; a pure function of its ids."""
    if churn <= 0.0:
        return True
    draw = np.random.default_rng([seed, 0xC4A2, boundary, device, cycle]).random()
    return bool(draw >= churn)


def reachable_at(boundary: int, t: float, faults: FaultConfig) -> float:
    """The first time >= t at which the boundary's link is up (outages and partitions)."""
    moved = True
    while moved:
        moved = False
        for iv in (*faults.outages, *faults.partitions):
            if iv.boundary == boundary and iv.start_s <= t < iv.end_s:
                t = iv.end_s
                moved = True
    return t


def compute_end(boundary: int, start_s: float, duration_s: float, faults: FaultConfig) -> float:
    """When compute of `duration_s` started at `start_s` ends, paused during outages."""
    t, left = start_s, duration_s
    for iv in sorted(faults.outages, key=lambda i: i.start_s):
        if iv.boundary != boundary or iv.end_s <= t:
            continue
        if iv.start_s <= t:
            t = iv.end_s
            continue
        if t + left <= iv.start_s:
            break
        left -= iv.start_s - t
        t = iv.end_s
    return t + left


def arrival_s(
    boundary: int, send_s: float, nbytes: int, link: LinkConfig, faults: FaultConfig
) -> float:
    """When a message sent at `send_s` arrives: deferred while the link is down."""
    return reachable_at(boundary, send_s, faults) + link.transfer_s(nbytes)
