"""Prometheus metrics of the boundary agent, served on its own (loopback) endpoint:
an organization's statistics stay inside it."""

from collections.abc import Callable, Mapping
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
EXPECTED_WORKERS = Gauge("echelon_agent_expected_workers", "Device workers configured")
WORKER_RESTARTS = Counter(
    "echelon_agent_worker_restarts_total",
    "Device workers that were started again after their process died",
)
INNER_SECONDS = Histogram(
    "echelon_agent_inner_seconds",
    "Duration of an inner phase (H steps on all devices)",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
PENDING = Gauge(
    "echelon_agent_pending_contributions",
    "Deltas trained and waiting to be contributed (kept inside the boundary)",
)
STALENESS = Gauge(
    "echelon_agent_staleness_versions",
    "Versions the oldest waiting delta is behind the held global version (0: none waiting)",
)
CONNECTED = Gauge(
    "echelon_agent_coordinator_sessions", "Window sessions open to the coordinator (0 or 1)"
)


class _Status(Protocol):
    @property
    def window(self) -> int: ...

    @property
    def held_version(self) -> int: ...

    @property
    def connected(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    @property
    def pending_base(self) -> int: ...


def _staleness(status: _Status) -> int:
    if status.pending == 0 or status.pending_base < 0:
        return 0
    return max(0, status.held_version - status.pending_base)


def watch_status(status: Callable[[], _Status]) -> None:
    """Reads the session's O(1) status at each scrape."""
    WINDOW.set_function(lambda: status().window)
    VERSION.set_function(lambda: status().held_version)
    CONNECTED.set_function(lambda: int(status().connected))
    PENDING.set_function(lambda: status().pending)
    STALENESS.set_function(lambda: _staleness(status()))


class WorkerWatch:
    """Counts worker restarts from the pool's shard -> pid table: a shard that has a new
    process id since the last look was started again (the pool restarts a dead worker when
    its next window begins)."""

    def __init__(self) -> None:
        self._pids: dict[int, int] = {}

    def look(self, pids: Mapping[int, int], alive: int) -> None:
        for shard, pid in pids.items():
            before = self._pids.get(shard)
            if before is not None and before != pid:
                WORKER_RESTARTS.inc()
        self._pids.update(pids)
        WORKERS.set(alive)


WORKER_WATCH = WorkerWatch()  # one device pool per agent process
