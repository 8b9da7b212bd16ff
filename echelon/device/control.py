"""Control plane between a boundary agent's device pool and its worker processes.

Control messages travel over one multiprocessing Pipe per worker (picklable frozen
dataclasses, no model state except the public global adapter for evaluation); with level-1
secure aggregation on, the round messages of each window travel there too: the window
protocol's own (`echelon.protocol.messages`: keys, shares, survivor signatures, unmasking
shares as the library's fixed-layout bytes; `WindowAborted` when the agent refuses the sum).
Tensors (the global adapter theta_v and the contributions) travel over the gloo group of
`group.py`, in which the agent is rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from echelon.device.group import GroupInfo
from echelon.protocol.messages import WindowAborted
from echelon.protocol.rounds import PartyMessage, RoundReply
from echelon.secagg import SecAggConfig
from echelon.training.data import DataConfig
from echelon.training.inner import InnerConfig
from echelon.training.model_config import LoraConfig, ModelConfig

Partition = Literal["iid", "dirichlet"]


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """Everything one worker process needs; picklable, sent once at spawn."""

    shard: int
    n_shards: int
    data: DataConfig
    partition: Partition
    dirichlet_alpha: float
    model_cfg: ModelConfig
    lora_cfg: LoraConfig
    inner_cfg: InnerConfig
    tokenizer_dir: Path
    threads: int
    device: str
    work_dir: Path
    eval_batches: int
    eval_batch_size: int
    record_updates: bool = False
    log_json: bool = False  # the agent logs JSON lines: its workers do too


@dataclass(frozen=True, kw_only=True)
class JoinGroup:
    group: GroupInfo
    rank: int


@dataclass(frozen=True, kw_only=True)
class SecureStart:
    """Level-1 secure aggregation of one window: the cohort (shard ids, which are the party
    ids), each member's Ed25519 identity public key (raw 32 bytes), the protocol config, the
    public neighbour-graph seed, and the token unit that scales a worker's weight
    (`w = tokens / token_unit`)."""

    cohort: tuple[int, ...]
    identities: tuple[tuple[int, bytes], ...]
    config: SecAggConfig
    graph_seed: bytes
    token_unit: float


@dataclass(frozen=True, kw_only=True)
class StartWindow:
    """Receive theta_v from rank 0, run `steps` inner steps, send the contribution to rank 0.
    With `secure` set, the worker first runs the key rounds over its Pipe and sends a masked
    contribution (see `secure.py`)."""

    window: int
    steps: int
    inner: InnerConfig | None
    send_timeout_s: float
    secure: SecureStart | None = None


@dataclass(frozen=True, kw_only=True)
class Evaluate:
    """Validation loss of the boundary's held-out text under the (global) adapter `theta`."""

    theta: np.ndarray


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True, kw_only=True)
class Ready:
    """The worker is up; `identity` is its Ed25519 identity public key (raw 32 bytes),
    generated at spawn, never leaving the process as a private key."""

    shard: int
    layout_json: str
    device: str
    identity: bytes


@dataclass(frozen=True, kw_only=True)
class Joined:
    generation: int


@dataclass(frozen=True, kw_only=True)
class WindowDone:
    window: int


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float


@dataclass(frozen=True, kw_only=True)
class WorkerError:
    """The worker could not do what it was asked; it keeps serving control messages."""

    message: str


SecureToWorker = RoundReply | WindowAborted
ToWorker = JoinGroup | StartWindow | Evaluate | Stop | SecureToWorker
FromWorker = Ready | Joined | WindowDone | EvalResult | WorkerError | PartyMessage
