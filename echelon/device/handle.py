"""The agent's handle on one worker process: what the pool's membership, its window
aggregations and level-1 secure aggregation all refer to, kept apart so that none of them
imports another for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess


@dataclass
class WorkerHandle:
    """The agent's handle on one worker process: its shard, process, pipe, group rank, and
    the Ed25519 identity public key (raw 32 bytes) it announced in `Ready`."""

    shard: int
    process: BaseProcess
    conn: Connection
    rank: int = 0
    identity: bytes = b""


def await_any(handles: Sequence[WorkerHandle], timeout_s: float, poll_s: float) -> None:
    """Returns once a reply is on one of the handles' pipes, one of their processes exited,
    or `timeout_s` passed: one wake-up per event, not one per poll. A process without an exit
    sentinel (a test's stand-in) is checked again every `poll_s` instead."""
    sentinels = [getattr(h.process, "sentinel", None) for h in handles]
    blind = any(s is None for s in sentinels)
    waitables = [h.conn for h in handles] + [s for s in sentinels if s is not None]
    wait(waitables, timeout=min(poll_s, timeout_s) if blind else timeout_s)
