"""Control plane between a boundary agent's device pool and its worker processes.

Control messages travel over one multiprocessing Pipe per worker (picklable frozen
dataclasses, no model state except the public global adapter for evaluation); with level-1
secure aggregation on, the key material of each window (the library's fixed-layout bytes:
advertisements, encrypted shares, survivor-list signatures, unmasking shares) travels there
too. Tensors (the global adapter theta_v and the contributions) travel over the gloo group of
`group.py`, in which the agent is rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from echelon.device.group import GroupInfo
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
class RelayAdvertisements:
    """Agent -> worker: every cohort member's `KeyAdvertisement.to_bytes()`."""

    window: int
    advertisements: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class RelayShares:
    """Agent -> worker: the `EncryptedShare.to_bytes()` addressed to this worker."""

    window: int
    shares: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class SignSurvivors:
    """Agent -> worker: the parties whose masked vector arrived; sign this list."""

    window: int
    survivors: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ReleaseShares:
    """Agent -> worker: the signed survivor list; release unmasking shares for it."""

    window: int
    survivors: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, kw_only=True)
class AbortWindow:
    """Agent -> worker: the window's sum is refused; keep local state and end the window."""

    window: int
    reason: str


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
class Advertised:
    """Worker -> agent: `KeyAdvertisement.to_bytes()` of this window."""

    window: int
    advertisement: bytes


@dataclass(frozen=True, kw_only=True)
class SharesSent:
    """Worker -> agent: `EncryptedShare.to_bytes()` for each neighbour, to relay."""

    window: int
    shares: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class SurvivorsSigned:
    """Worker -> agent: Ed25519 signature over the announced survivor list."""

    window: int
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class SharesReleased:
    """Worker -> agent: `UnmaskingShares.to_bytes()`."""

    window: int
    shares: bytes


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float


@dataclass(frozen=True, kw_only=True)
class WorkerError:
    """The worker could not do what it was asked; it keeps serving control messages."""

    message: str


SecureToWorker = RelayAdvertisements | RelayShares | SignSurvivors | ReleaseShares | AbortWindow
SecureFromWorker = Advertised | SharesSent | SurvivorsSigned | SharesReleased
ToWorker = JoinGroup | StartWindow | Evaluate | Stop | SecureToWorker
FromWorker = Ready | Joined | WindowDone | EvalResult | WorkerError | SecureFromWorker
