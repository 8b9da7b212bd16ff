"""Keyed timers for a protocol core's executor: `set(key, at)` replaces the key's previous
deadline; a daemon thread calls `fire(key)` when a deadline passes (wall clock)."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Hashable


class Timers:
    def __init__(self, fire: Callable[[Hashable], None], clock: Callable[[], float] = time.time):
        self._fire = fire
        self._clock = clock
        self._heap: list[tuple[float, int, Hashable]] = []
        self._latest: dict[Hashable, float] = {}
        self._seq = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._thread.start()

    def set(self, key: Hashable, at: float) -> None:
        with self._cond:
            self._latest[key] = at
            heapq.heappush(self._heap, (at, self._seq, key))
            self._seq += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap:
                        wait = self._heap[0][0] - self._clock()
                        if wait <= 0:
                            break
                        self._cond.wait(timeout=min(wait, 1.0))
                    else:
                        self._cond.wait()
                if self._stopped:
                    return
                at, _, key = heapq.heappop(self._heap)
                if self._latest.get(key) != at:
                    continue  # superseded
                del self._latest[key]
            self._fire(key)
