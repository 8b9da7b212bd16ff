"""Prometheus metrics of the boundary agent, served on its own (loopback) endpoint:
an organization's statistics stay inside it."""

from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import BYTES_IN as BYTES_IN
from services.common.metrics import BYTES_OUT as BYTES_OUT

TOKENS = Counter("echelon_agent_tokens_total", "Tokens trained inside the boundary")
TOKENS_PER_S = Gauge("echelon_agent_tokens_per_second", "Tokens/s of the last inner phase")
WINDOW = Gauge("echelon_agent_window_id", "Last window the agent took part in")
VERSION = Gauge("echelon_agent_global_version", "Global adapter version the agent holds")
INNER_STEPS = Gauge("echelon_agent_inner_steps", "Inner steps H of the current window")
TRAIN_LOSS = Gauge(
    "echelon_agent_train_loss", "Mean inner training loss of the last window (nats per token)"
)
VAL_LOSS = Gauge(
    "echelon_agent_val_loss", "Validation loss on the boundary's held-out text (nats per token)"
)
WORKERS = Gauge("echelon_agent_alive_workers", "Device workers alive")
INNER_SECONDS = Histogram(
    "echelon_agent_inner_seconds",
    "Duration of an inner phase (H steps on all devices)",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)


class _Status(Protocol):
    @property
    def window(self) -> int: ...

    @property
    def held_version(self) -> int: ...


def watch_status(status: Callable[[], _Status]) -> None:
    """Reads the window and the held version from the session's status at each scrape."""
    WINDOW.set_function(lambda: status().window)
    VERSION.set_function(lambda: status().held_version)
