"""Prometheus metrics of the audit log service."""

from prometheus_client import Counter, Gauge, Histogram

from echelon.audit.record import PayloadType
from services.common.metrics import BUILD_INFO as BUILD_INFO

VERDICTS = ("accepted", "refused")
APPENDS = Counter(
    "echelon_audit_appends_total",
    "Records appended, by payload type and verdict (refused: the record names a payload "
    "that must not have crossed, or breaks the declared policy)",
    ["payload_type", "verdict"],
)
for _type in PayloadType:  # every (type, verdict) is a series from the start
    if _type is not PayloadType.UNSPECIFIED:
        for _verdict in VERDICTS:
            APPENDS.labels(payload_type=_type.name, verdict=_verdict)
REFUSED = Counter(
    "echelon_audit_requests_refused_total", "Requests refused, by RPC and status", ["rpc", "code"]
)
TREE_ENTRIES = Gauge("echelon_audit_tree_entries", "Entries in the audit log (its tree size)")
APPEND_SECONDS = Histogram(
    "echelon_audit_append_seconds",
    "Append latency (validate, verify, fsync; a head signature every few appends)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
