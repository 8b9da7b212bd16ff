"""The window driver's bookkeeping: event kinds, each boundary's contribution status, and the
open window (cohort, deadline config, collected contributions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from echelon.sim.boundary import Contribution
from echelon.window import WindowConfig


class Kind(Enum):
    """Events of the simulation, fired in (time, sequence) order."""

    OPEN = auto()
    READY = auto()
    ARRIVE = auto()
    DEADLINE = auto()
    VERSION = auto()


class Status(Enum):
    """Where a boundary's current contribution is."""

    TRAINING = auto()
    HOLDING = auto()
    SUBMITTED = auto()
    IDLE = auto()


@dataclass
class Track:
    """The coordinator-visible life of one boundary's contributions."""

    status: Status = Status.TRAINING
    held: Contribution | None = None
    window: int = 0
    wait_version: int | None = None
    flight_start: float = 0.0


@dataclass
class OpenWindow:
    """The window being collected; `got` maps boundary -> (contribution, weight)."""

    id: int
    version: int
    opened: float
    cohort: tuple[int, ...]
    inner_steps: int
    config: WindowConfig
    key_ready: float
    got: dict[int, tuple[Contribution, float]] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    closed: bool = False
