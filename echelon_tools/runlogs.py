"""What a real deployment measured, read back from its services' JSON logs: committed
windows, the device pools' training runs, the round trips each organization waited on, and
tokens/s and idle time of the devices over an interval (`echelon wan-check`, `make bench`).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

COORDINATOR = "coordinator"  # the coordinator's party name in audit records


def events(path: Path, name: str) -> list[dict[str, Any]]:
    """The log's events called `name`, in the order written."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a worker's stray print or a traceback line
        if isinstance(event, dict) and event.get("event") == name:
            out.append(event)
    return out


def timestamp(event: dict[str, Any]) -> float:
    """Seconds since the epoch at which the service logged `event` (its ISO UTC stamp).

    Raises KeyError or ValueError when the event has no valid timestamp."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


@dataclass(frozen=True)
class Commit:
    """A committed window, as the coordinator logged it."""

    window: int
    at: float  # epoch seconds of the commit
    seconds: float  # from the window's open to its commit (coordinator clock)


def commits(coordinator_log: Path) -> list[Commit]:
    return [
        Commit(int(e["window"]), timestamp(e), float(e["seconds"]))
        for e in events(coordinator_log, "window_done")
        if e.get("committed")
    ]


@dataclass(frozen=True)
class TrainingRun:
    """One run of a boundary's device pool: it ended at `end` (epoch seconds) after
    `seconds` (its devices busy: inner steps, level-1 aggregation, evaluation) and trained
    `tokens`. `window` is the window the agent tagged it with (-1 where there is none)."""

    boundary: str
    end: float
    seconds: float
    tokens: int
    window: int = -1

    @property
    def start(self) -> float:
        return self.end - self.seconds


def training_runs(agent_log: Path, boundary: str) -> list[TrainingRun]:
    """The agent's `delta_ready` events: every run its devices finished."""
    return [
        TrainingRun(boundary, timestamp(e), float(e["train_s"]), int(e["tokens"]), int(e["window"]))
        for e in events(agent_log, "delta_ready")
    ]


def round_trips(agent_log: Path, boundary: str) -> dict[int, int]:
    """Round trips between the organization and the coordinator per window, counted from
    the frames its agent recorded (`audit_recorded`, one per frame either way): each step
    from a frame it sent to a frame it received is one round trip it waited on.

    Window w's cycle runs from the delivery of the previous global version (GLOBAL_ADAPTER
    received) to the delivery of w's, and only w's own frames in it count: the next
    window's key rounds, which ride on w's messages when pre-keyed, interleave with them
    without being waited on, and w's key rounds that ran before the cycle (pre-keyed in
    the previous one) were off its path. The audit log's round trips are not counted here:
    the agent does not log when its pipelined appends are answered."""
    out: dict[int, int] = {}
    cycle: list[tuple[int, bool]] = []  # (window, sent) of each frame since the last delivery
    started = False
    for e in events(agent_log, "audit_recorded"):
        sent = e.get("sender") == boundary and e.get("receiver") == COORDINATOR
        received = e.get("sender") == COORDINATOR and e.get("direction") == "received"
        if not (sent or received):
            continue
        window = int(e["window"])
        cycle.append((window, sent))
        if received and e.get("payload_type") == "GLOBAL_ADAPTER":
            if started:
                own = [was_sent for w, was_sent in cycle if w == window]
                out[window] = sum(
                    1 for before, now in itertools.pairwise(own) if before and not now
                )
            started, cycle = True, []
    return out


@dataclass(frozen=True)
class Throughput:
    """Tokens trained per second by all boundaries' devices over [start, end], and the
    share of that time each boundary's devices sat idle (no pool run in progress)."""

    start: float
    end: float
    tokens: float
    idle: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def idle_fraction(self) -> float:
        """Mean over the boundaries."""
        return statistics.fmean(self.idle.values())


def throughput(runs: Iterable[TrainingRun], start: float, end: float) -> Throughput:
    """Tokens/s and idle time over [start, end]; a run that straddles an end counts with the
    share of its tokens and seconds inside (its tokens spread evenly over its seconds).

    Raises ValueError for an empty interval or no runs."""
    if not end > start:
        raise ValueError(f"throughput: got [{start}, {end}], want start < end")
    tokens = 0.0
    busy: dict[str, float] = {}
    for run in runs:
        inside = max(0.0, min(run.end, end) - max(run.start, start))
        busy[run.boundary] = busy.get(run.boundary, 0.0) + inside
        if run.seconds > 0:
            tokens += run.tokens * inside / run.seconds
    if not busy:
        raise ValueError("throughput: no training runs")
    span = end - start
    return Throughput(start, end, tokens, {b: 1.0 - s / span for b, s in sorted(busy.items())})
