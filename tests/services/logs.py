"""Waiting on a service's structured log (JSON lines) for an event: how tests over real
processes gate a fault on a protocol stage the process reached."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.05


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """Every JSON log line of `path` whose event is `event` (other lines are skipped)."""
    found = []
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if entry.get("event") == event:
            found.append(entry)
    return found


def wait_for_event(
    path: Path,
    event: str,
    timeout_s: float,
    where: Callable[[dict[str, Any]], bool] = lambda entry: True,
    alive: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """The first `event` in the log at `path` that satisfies `where`, once it is written.

    Raises:
        AssertionError: the process stopped (`alive` False) or `timeout_s` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for entry in log_events(path, event):
            if where(entry):
                return entry
        if not alive():
            raise AssertionError(f"the process of {path.name} exited before {event!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} in {path} within {timeout_s:.0f} s")
        time.sleep(POLL_S)
