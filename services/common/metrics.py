"""Metrics every service shares: bytes crossing a boundary, by payload type and direction."""

from prometheus_client import Counter

BYTES_OUT = Counter(
    "echelon_cross_boundary_bytes_sent_total",
    "Bytes sent across an organization's boundary",
    ["payload_type"],
)
BYTES_IN = Counter(
    "echelon_cross_boundary_bytes_received_total",
    "Bytes received across an organization's boundary",
    ["payload_type"],
)
