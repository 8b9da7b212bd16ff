"""Stage observers: a component reports the named stages it reaches in a window to an
optional callback, so a test can make a fault fire at a stage instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable

# Called with (stage, window); it runs in the component's thread and may block it.
StageObserver = Callable[[str, int], None]


def ignore_stage(stage: str, window: int) -> None:
    """The default observer: production code reports to nobody."""
