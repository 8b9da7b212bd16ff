"""Prometheus metrics of the boundary agent."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import BYTES_IN as BYTES_IN
from services.common.metrics import BYTES_OUT as BYTES_OUT

TOKENS = Counter("echelon_agent_tokens_total", "Tokens trained inside the boundary")
TOKENS_PER_S = Gauge("echelon_agent_tokens_per_second", "Tokens/s of the last inner phase")
WINDOW = Gauge("echelon_agent_window", "Window the agent takes part in")
VERSION = Gauge("echelon_agent_global_version", "Global adapter version the agent holds")
INNER_STEPS = Gauge("echelon_agent_inner_steps", "Inner steps H of the current window")
TRAIN_LOSS = Gauge("echelon_agent_train_loss", "Mean inner training loss of the last window")
VAL_LOSS = Gauge("echelon_agent_val_loss", "Validation loss on the boundary's held-out text")
WORKERS = Gauge("echelon_agent_workers_alive", "Device workers alive")
INNER_SECONDS = Histogram(
    "echelon_agent_inner_seconds",
    "Duration of an inner phase (H steps on all devices)",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
