"""Prometheus metrics of the global coordinator: cohort-level only (from masked sums),
never one boundary's statistic."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import BYTES_IN as BYTES_IN
from services.common.metrics import BYTES_OUT as BYTES_OUT

WINDOW = Gauge("echelon_coordinator_window_id", "Last window that closed")
VERSION = Gauge("echelon_coordinator_global_version", "Latest global adapter version")
INNER_STEPS = Gauge("echelon_coordinator_inner_steps", "Inner steps H sent with the window")
WINDOWS = Counter("echelon_coordinator_windows_total", "Windows by outcome", ["outcome"])
WINDOW_SECONDS = Histogram(
    "echelon_coordinator_window_seconds",
    "Duration of a window from open to distribution",
    buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
)
CONTRIBUTIONS = Gauge("echelon_coordinator_contributions", "Contributions in the last window")
COHORT = Gauge("echelon_coordinator_cohort_boundaries", "Boundaries in the last cohort")
STALENESS = Histogram(
    "echelon_coordinator_staleness_versions",
    "Largest staleness in a window's cohort (versions behind)",
    buckets=(0, 1, 2, 3, 5, 8),
)
TRAIN_LOSS = Gauge(
    "echelon_coordinator_train_loss",
    "Cohort mean train loss of the last window (masked sums; nats per token)",
)
AGREEMENT = Gauge(
    "echelon_coordinator_agreement_ratio", "||sum w delta|| / sum w ||delta||, in [0, 1]"
)
H_DECISIONS = Counter(
    "echelon_coordinator_sync_decisions_total", "Sync-controller decisions by reason", ["reason"]
)
MU = Gauge("echelon_coordinator_proximal_mu", "Proximal coefficient mu sent with the window")
SESSIONS = Gauge("echelon_coordinator_sessions", "Agents with an open window session")
FRAMES_OUT = Counter(
    "echelon_coordinator_messages_sent_total", "Protocol messages sent to agents", ["kind"]
)
DRIFT_RMS = Gauge(
    "echelon_coordinator_drift_rms_ratio",
    "Cohort RMS of relative drift ||delta|| / ||theta|| (masked sums)",
)
