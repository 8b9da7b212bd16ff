"""What an executor feeds the protocol cores (events) and what the cores ask of it
(commands). A core never touches a socket, a thread or a clock: time is a parameter of
every call, deadlines are timers the executor fires, and I/O is a command."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from echelon.protocol.messages import Message

COORDINATOR = "coordinator"

# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """`message` arrived from `sender` (already authenticated and parsed by the executor)."""

    sender: str
    message: Message


@dataclass(frozen=True)
class TimerFired:
    key: Hashable


@dataclass(frozen=True)
class PartyFailed:
    """A party failed at the transport (disconnected, timed out, sent bytes that do not
    parse): that party's failure, never the core's."""

    party: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class TrainedDelta:
    """What one training run of a boundary's devices produced: the level-1 sum of their
    deltas against the cycle's base version (a pseudo-gradient `theta_base - theta`)."""

    delta: np.ndarray
    base_version: int
    tokens: int
    devices: int
    train_loss: float


@dataclass(frozen=True)
class TrainingFinished:
    result: TrainedDelta


@dataclass(frozen=True)
class TrainingFailed:
    reason: str


Event = Received | TimerFired | PartyFailed | TrainingFinished | TrainingFailed

# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True)
class SetTimer:
    key: Hashable
    at: float


@dataclass(frozen=True, kw_only=True)
class Train:
    """Run `steps` inner steps on the devices. `fresh`: every device starts from global
    `version` (`phi`), which becomes the cycle's base; otherwise devices continue from where
    they are (delay-aware overlap) and remember that point for a later `Rebase`."""

    window: int
    version: int
    phi: np.ndarray
    steps: int
    mu: float
    fresh: bool


@dataclass(frozen=True, kw_only=True)
class Rebase:
    """Delay-aware re-base: each device `theta <- theta_(v+1) + carry * (theta - theta_at_
    continue)`; `version` becomes the cycle's base."""

    version: int
    phi: np.ndarray
    carry: float


@dataclass(frozen=True, kw_only=True)
class CommitVersion:
    """Store global `version` durably before it is distributed."""

    window: int
    version: int
    phi: np.ndarray
    momentum: np.ndarray | None
    aggregate: np.ndarray  # [sum w x, sum w], float64: what replay needs
    contributors: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class WindowOutcome:
    """How a window ended (for logs, metrics, tests and the parity check)."""

    window: int
    committed: bool
    reason: str
    version: int
    contributors: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    inner_steps: int = 0
    signals: dict[str, float] = field(default_factory=dict)
    opened_s: float = 0.0  # when the window opened (the core's clock)
    decision: str = ""  # the sync controller's reason for the next H, when it runs


@dataclass(frozen=True, kw_only=True)
class Note:
    """Something an auditor or operator must see: a refusal, a dropped or spent delta."""

    kind: str
    window: int
    party: str
    reason: str
    staleness: int = -1  # of a dropped delta


@dataclass(frozen=True, kw_only=True)
class DeltaSpent:
    """Persist before the next command: this boundary's delta of `window` is spent (its
    unmasking shares are about to leave); it is never sent again."""

    window: int
    base_version: int


Command = Send | SetTimer | Train | Rebase | CommitVersion | WindowOutcome | Note | DeltaSpent
