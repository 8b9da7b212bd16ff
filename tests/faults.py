"""Event-gated fault injection for tests, in the manner of torchft's `EventInjector`.

A component reports each stage it reaches (`FaultPlan.reached`, or the observer from
`FaultPlan.observer(party)` passed as its `on_stage`); the plan then fires what the test
declared for that stage, in the reporting thread, before the component goes on:

    plan = FaultPlan().fail_at(1, "theta_sent", window=0, action=kill).hold_at("org-b", "training")

- `fail_at` runs an action once (kill a worker, raise) when the party reaches the stage;
- `hold_at` blocks the party at the stage until the test calls `release`, or until another
  stage is reached (`until=`): a late boundary without guessing how late;
- `wait` blocks the test until a party has reached a stage (with a generous deadline).

Nothing here sleeps for a guessed duration: the order of events is the protocol's own.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from echelon.stages import StageObserver

Party = str | int
# Generous: a deadline that only a broken protocol reaches, never one that orders events.
WAIT_S = 60.0


@dataclass(frozen=True)
class Stage:
    """A party at a named stage of a window; `window` None matches every window."""

    party: Party
    name: str
    window: int | None = None

    def matches(self, party: Party, name: str, window: int) -> bool:
        return (
            self.party == party
            and self.name == name
            and (self.window is None or self.window == window)
        )


@dataclass
class _Fault:
    at: Stage
    action: Callable[[], None]
    fired: int = 0


@dataclass
class _Hold:
    at: Stage
    until: Stage | None
    released: threading.Event = field(default_factory=threading.Event)


class FaultPlan:
    """Faults and holds keyed by (party, stage, window), and a count of every stage reached."""

    def __init__(self) -> None:
        self._faults: list[_Fault] = []
        self._holds: list[_Hold] = []
        self._reached: Counter[tuple[Party, str, int]] = Counter()
        self._changed = threading.Condition()

    # ---- building ---------------------------------------------------------------------
    def fail_at(
        self, party: Party, stage: str, *, action: Callable[[], None], window: int | None = None
    ) -> FaultPlan:
        """Run `action` in the reporting thread the first time `party` reaches `stage`."""
        self._faults.append(_Fault(Stage(party, stage, window), action))
        return self

    def hold_at(
        self, party: Party, stage: str, *, window: int | None = None, until: Stage | None = None
    ) -> FaultPlan:
        """Block `party` at `stage` until `release` (or until the stage `until` is reached)."""
        self._holds.append(_Hold(Stage(party, stage, window), until))
        return self

    # ---- driving ----------------------------------------------------------------------
    def release(self, party: Party, stage: str, *, window: int | None = None) -> None:
        for hold in self._holds:
            if hold.at == Stage(party, stage, window):
                hold.released.set()

    def release_all(self) -> None:
        """Let every held party go (teardown: no thread stays blocked after a test)."""
        for hold in self._holds:
            hold.released.set()

    def reached(self, party: Party, stage: str, window: int) -> None:
        """Called by (or for) a component at a stage: count it, fire its faults, then block
        while a hold for it is in place."""
        with self._changed:
            self._reached[(party, stage, window)] += 1
            due = [f for f in self._faults if f.fired == 0 and f.at.matches(party, stage, window)]
            for fault in due:
                fault.fired += 1
            self._changed.notify_all()
        for hold in self._holds:
            if hold.until is not None and hold.until.matches(party, stage, window):
                hold.released.set()
        for fault in due:
            fault.action()
        for hold in self._holds:
            if hold.at.matches(party, stage, window):
                hold.released.wait()

    def observer(self, party: Party) -> StageObserver:
        """An `on_stage` callback that reports `party`'s stages to this plan."""

        def on_stage(stage: str, window: int) -> None:
            self.reached(party, stage, window)

        return on_stage

    # ---- asserting --------------------------------------------------------------------
    def count(self, party: Party, stage: str, *, window: int | None = None) -> int:
        """How often `party` has reached `stage` (in `window`, or in any)."""
        at = Stage(party, stage, window)
        with self._changed:
            return sum(n for (p, s, w), n in self._reached.items() if at.matches(p, s, w))

    def wait(
        self,
        party: Party,
        stage: str,
        *,
        window: int | None = None,
        times: int = 1,
        timeout_s: float = WAIT_S,
    ) -> None:
        """Block until `party` has reached `stage` `times` times.

        Raises:
            AssertionError: not reached within `timeout_s` (the protocol is stuck).
        """
        give_up = time.monotonic() + timeout_s
        with self._changed:
            while self.count(party, stage, window=window) < times:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{party} did not reach {stage!r} (window {window}) {times}x "
                        f"within {timeout_s}s; reached: {dict(self._reached)}"
                    )
                self._changed.wait(left)

    def unfired(self) -> list[Stage]:
        """The declared faults whose stage was never reached."""
        return [f.at for f in self._faults if f.fired == 0]


def kill_and_wait(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL `pid` and block until it has exited (a zombie counts: it can no longer reply).

    Raises:
        AssertionError: the process still runs after `timeout_s`.
    """
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        # A pidfd becomes readable when its process exits, whoever its parent is.
        ready, _, _ = select.select([handle], [], [], timeout_s)
        if not ready:
            raise AssertionError(f"process {pid} still runs {timeout_s}s after SIGKILL")
    finally:
        os.close(handle)
