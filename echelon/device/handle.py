"""The agent's handle on one worker process: what the pool's membership, its window
aggregations and level-1 secure aggregation all refer to, kept apart so that none of them
imports another for it."""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
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
