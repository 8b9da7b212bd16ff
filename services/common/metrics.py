"""Metrics every service shares: build information, bytes crossing a boundary by payload
type and direction, and a party's watch over the audit log (witnessed tree heads, halts)."""

import platform

from prometheus_client import Counter, Gauge

import echelon

BUILD_INFO = Gauge(
    "echelon_build_info",
    "Constant 1, labelled with the Echelon version and the Python it runs on",
    ["version", "python_version"],
)
BUILD_INFO.labels(echelon.__version__, platform.python_version()).set(1)
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
WITNESS_OUTCOMES = ("ok", "inconsistent", "unreachable")
WITNESS_CHECKS = Counter(
    "echelon_audit_witness_checks_total",
    "Checks of the audit log's signed tree head by this party, by outcome "
    "(inconsistent: a rollback or a fork; the party halts its egress)",
    ["outcome"],
)
for _outcome in WITNESS_OUTCOMES:  # every outcome is a series from the start
    WITNESS_CHECKS.labels(_outcome)
WITNESSED_ENTRIES = Gauge(
    "echelon_audit_witnessed_tree_entries",
    "Tree size of the latest signed tree head this party verified",
)
EGRESS_HALTS = Counter(
    "echelon_audit_egress_halts_total",
    "Times this party stopped all egress (its audit log failed a check or took no record); "
    "a halted party stays halted until a person restarts it",
)
