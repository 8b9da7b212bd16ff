"""The simulator's executor of the window protocol cores: one discrete-event loop on a
virtual clock that delivers the cores' messages over a network model, fires their timers,
and runs their training commands on in-process trainers. Nothing sleeps and nothing here
decides anything about a window: the cores do (`echelon.protocol`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from echelon.protocol.boundary import BoundaryCore
from echelon.protocol.coordinator import CoordinatorCore
from echelon.protocol.events import (
    COORDINATOR,
    Command,
    CommitVersion,
    DeltaSpent,
    Event,
    Note,
    Rebase,
    Received,
    Send,
    SetTimer,
    TimerFired,
    Train,
    TrainedDelta,
    TrainingFinished,
    WindowOutcome,
)
from echelon.protocol.messages import Message

CONTROL_BYTES = 256


class Trainer(Protocol):
    """A boundary's devices, in process: trains at once and says how long it would take."""

    def train(self, command: Train, now: float) -> tuple[TrainedDelta, float]: ...

    def rebase(self, command: Rebase) -> None: ...


class Network(Protocol):
    def arrival(self, sender: str, receiver: str, size: int, now: float) -> float | None:
        """When a message of `size` bytes sent at `now` arrives; None when it is lost."""
        ...


@dataclass(frozen=True)
class FixedLatency:
    """Every link: `latency_s` one way plus size / bandwidth."""

    latency_s: float = 0.0
    bandwidth_bytes_s: float = float("inf")

    def arrival(self, sender: str, receiver: str, size: int, now: float) -> float | None:
        return now + self.latency_s + size / self.bandwidth_bytes_s


def message_bytes(message: Message) -> int:
    """A message's size on the wire, for the network model (payload bytes + framing)."""
    size = CONTROL_BYTES
    for value in vars(message).values():
        if isinstance(value, np.ndarray):
            size += value.nbytes
        elif isinstance(value, bytes):
            size += len(value)
        elif isinstance(value, tuple):
            for item in value:
                if isinstance(item, bytes):
                    size += len(item)
                elif isinstance(item, tuple):
                    size += sum(len(x) for x in item if isinstance(x, bytes))
    return size


@dataclass
class Trace:
    """What an executor run produced, for results, tests and the parity check."""

    outcomes: list[WindowOutcome] = field(default_factory=list)
    commits: list[CommitVersion] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    spent: list[tuple[str, DeltaSpent]] = field(default_factory=list)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    messages: list[tuple[float, str, str, Message]] = field(default_factory=list)


Fault = Callable[[str, str, Message], Message | None]


class VirtualExecutor:
    """Runs a coordinator core and boundary cores in virtual time."""

    def __init__(
        self,
        coordinator: CoordinatorCore,
        boundaries: dict[str, BoundaryCore],
        trainers: dict[str, Trainer],
        network: Network,
        *,
        fault: Fault | None = None,
        record_messages: bool = False,
    ) -> None:
        """`fault(sender, receiver, message)` may replace or drop (None) any message: the
        hostile-party hook of the tests."""
        self.coordinator = coordinator
        self.boundaries = boundaries
        self.trainers = trainers
        self.network = network
        self.fault = fault
        self.record_messages = record_messages
        self.now = 0.0
        self.trace = Trace()
        self._events: list[tuple[float, int, str, Event]] = []
        self._seq = 0
        self._timers: dict[Hashable, float] = {}
        self._last_arrival: dict[tuple[str, str], float] = {}
        self.on_commit: Callable[[float, CommitVersion], None] | None = None

    def _push(self, at: float, target: str, event: Event) -> None:
        heapq.heappush(self._events, (at, self._seq, target, event))
        self._seq += 1

    def start(self, at: dict[str, float] | None = None) -> None:
        """Every boundary joins (at `at[b]`, default 0: its devices are ready then)."""
        for name, core in self.boundaries.items():
            self.now = (at or {}).get(name, 0.0)
            self._execute(name, core.start(self.now))
        self.now = 0.0

    def start_one(self, name: str) -> None:
        """Boundary `name` (re)joins now, e.g. after its core was restarted from its state."""
        self._execute(name, self.boundaries[name].start(self.now))

    def run(self, *, until: Callable[[], bool], max_time_s: float = float("inf")) -> Trace:
        """Processes events in time order until `until()` holds or nothing is left."""
        while self._events and not until():
            at, _, target, event = heapq.heappop(self._events)
            if at > max_time_s:
                break
            if isinstance(event, TimerFired) and self._timers.get((target, event.key)) != at:
                continue  # superseded by a later SetTimer of the same key
            self.now = at
            if target == COORDINATOR:
                commands = self.coordinator.handle(event, at)
            else:
                commands = self.boundaries[target].handle(event, at)
            self._execute(target, commands)
        return self.trace

    def _execute(self, source: str, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Send):
                self._send(source, command.to, command.message)
            elif isinstance(command, SetTimer):
                self._timers[(source, command.key)] = command.at
                self._push(command.at, source, TimerFired(command.key))
            elif isinstance(command, Train):
                result, seconds = self.trainers[source].train(command, self.now)
                self.trace.tokens += result.tokens
                self._push(self.now + seconds, source, TrainingFinished(result))
            elif isinstance(command, Rebase):
                self.trainers[source].rebase(command)
            elif isinstance(command, CommitVersion):
                self.trace.commits.append(command)
                if self.on_commit is not None:
                    self.on_commit(self.now, command)
            elif isinstance(command, WindowOutcome):
                self.trace.outcomes.append(command)
            elif isinstance(command, Note):
                self.trace.notes.append(command)
            elif isinstance(command, DeltaSpent):
                self.trace.spent.append((source, command))

    def _send(self, sender: str, receiver: str, message: Message) -> None:
        if self.fault is not None:
            replaced = self.fault(sender, receiver, message)
            if replaced is None:
                return
            message = replaced
        size = message_bytes(message)
        self.trace.bytes_sent[sender] = self.trace.bytes_sent.get(sender, 0) + size
        arrival = self.network.arrival(sender, receiver, size, self.now)
        if arrival is None:
            return
        link = (sender, receiver)
        arrival = max(arrival, self._last_arrival.get(link, 0.0))  # one ordered stream
        self._last_arrival[link] = arrival
        if self.record_messages:
            self.trace.messages.append((self.now, sender, receiver, message))
        self._push(arrival, receiver, Received(sender, message))
