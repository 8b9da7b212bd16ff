"""Metric names follow Prometheus conventions: the `echelon_` prefix, base units in the
name, counters ending `_total`, no unit-less ambiguous names; and the docs name only
metrics the services export, and the operator's reference (docs/operations.md) every one."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    "services.common.metrics",
    "services.audit_log.metrics",
    "services.global_coordinator.metrics",
    "services.boundary_agent.metrics",
)
# prometheus_client's own collectors: process, GC and platform.
LIBRARY_PREFIXES = ("process_", "python_")

# What a gauge's or a histogram's name may end with, each with what it means.
UNITS = {
    "seconds": "time, in the base unit",
    "bytes": "size, in the base unit",
    "ratio": "a fraction of two like quantities",
    "per_second": "a rate",
    "info": "constant labels (build_info)",
}
COUNTED = {  # a count of things the noun names (like process_open_fds)
    "tokens",
    "steps",
    "workers",
    "sessions",
    "boundaries",
    "contributions",
    "entries",
    "versions",
    "windows",
}
ORDINALS = {"id": "a window's number", "version": "a global adapter version's number"}
DIMENSIONLESS = {"loss": "cross-entropy, nats per token", "mu": "FedProx's proximal weight"}
NOT_BASE_UNITS = {
    *("ms", "us", "ns", "millis", "milliseconds", "microseconds", "nanoseconds"),
    *("minutes", "hours", "days", "kb", "mb", "gb", "kib", "mib", "gib"),
    *("kilobytes", "megabytes", "gigabytes", "bits", "percent", "pct"),
}
SUFFIXES = {*UNITS, *COUNTED, *ORDINALS, *DIMENSIONLESS}
# Renamed to follow the rules; the README names the old ones for dashboards to migrate.
RENAMED = {
    "echelon_agent_window": "echelon_agent_window_id",
    "echelon_agent_workers_alive": "echelon_agent_alive_workers",
    "echelon_coordinator_window": "echelon_coordinator_window_id",
    "echelon_coordinator_cohort_size": "echelon_coordinator_cohort_boundaries",
    "echelon_coordinator_staleness": "echelon_coordinator_staleness_versions",
    "echelon_coordinator_agreement": "echelon_coordinator_agreement_ratio",
    "echelon_coordinator_drift_rms": "echelon_coordinator_drift_rms_ratio",
    "echelon_coordinator_mu": "echelon_coordinator_proximal_mu",
    "echelon_audit_tree_size": "echelon_audit_tree_entries",
}


def _families() -> list[Metric]:
    for module in MODULES:
        importlib.import_module(module)
    return [m for m in REGISTRY.collect() if not m.name.startswith(LIBRARY_PREFIXES)]


def _declared() -> dict[str, str]:
    """Name -> kind of every metric the services' metrics modules construct."""
    out: dict[str, str] = {}
    for module in MODULES:
        path = ROOT / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")
            ):
                first = node.args[0]
                assert isinstance(first, ast.Constant) and isinstance(first.value, str)
                out[first.value] = node.func.id
    return out


def test_only_the_metrics_modules_define_metrics() -> None:
    """So that walking the registry after importing MODULES sees every metric."""
    allowed = {ROOT / (m.replace(".", "/") + ".py") for m in MODULES}
    allowed.add(ROOT / "services" / "common" / "obs.py")  # serves them; defines none
    for package in ("echelon", "services", "echelon_tools"):
        for path in (ROOT / package).rglob("*.py"):
            if "prometheus_client" in path.read_text():
                assert path in allowed, path


def test_registered_metrics_follow_the_naming_rules() -> None:
    families = _families()
    assert len(families) >= 25
    for family in families:
        name = family.name
        assert re.fullmatch(r"echelon_[a-z][a-z0-9_]*[a-z0-9]", name), name
        words = set(name.split("_"))
        assert not words & NOT_BASE_UNITS, f"{name}: use base units (seconds, bytes)"
        if family.type == "histogram":
            assert any(name.endswith("_" + s) for s in ("seconds", "bytes", *COUNTED)), (
                f"{name}: a histogram's name ends with the unit it observes"
            )
        elif family.type == "gauge":
            assert any(name.endswith("_" + s) for s in SUFFIXES), (
                f"{name}: end with a unit or a counted noun: {sorted(SUFFIXES)}"
            )
        else:  # exposed as <name>_total, and declared so (the next test)
            assert family.type == "counter", (name, family.type)


def test_the_name_in_the_code_is_the_name_on_the_wire() -> None:
    declared = _declared()
    counters = [name for name, kind in declared.items() if kind == "Counter"]
    assert counters and all(name.endswith("_total") for name in counters), counters
    exposed = {m.name for m in _families()}
    assert {name.removesuffix("_total") for name in declared} == exposed


def _documented(path: Path) -> set[str]:
    pattern = r"`(echelon_(?:(?:agent|coordinator|audit|cross_boundary)_[a-z0-9_]+|build_info))"
    return set(re.findall(pattern, path.read_text()))


def _exposed_samples() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in _families()
        for suffix in suffixes.get(family.type, ("",))
    }


@pytest.mark.parametrize(
    "doc",
    [
        *("README.md", "docs/configuration.md", "docs/audit.md", "docs/protocol.md"),
        "docs/operations.md",
    ],
)
def test_docs_name_only_exported_metrics(doc: str) -> None:
    exposed = _exposed_samples()
    unknown = _documented(ROOT / doc) - exposed - (set(RENAMED) if doc == "README.md" else set())
    assert not unknown, f"{doc} names metrics no service exports: {sorted(unknown)}"


def test_renamed_metrics_are_gone_and_their_new_names_exported() -> None:
    exposed = {m.name for m in _families()}
    assert not set(RENAMED) & exposed
    assert set(RENAMED.values()) <= exposed


def test_the_operations_guide_lists_every_metric() -> None:
    listed = _documented(ROOT / "docs" / "operations.md")
    missing = {f.name for f in _families()} - {n.removesuffix("_total") for n in listed}
    assert not missing, f"docs/operations.md's metrics table lacks {sorted(missing)}"


def test_label_values_an_alert_matches_on_exist_before_the_event() -> None:
    """A selector such as `{outcome="inconsistent"}` returns a series (at 0) before the first
    inconsistency, so that alert rules and dashboards see the metric from the start."""
    samples = {
        (family.name, tuple(sorted(sample.labels.items())))
        for family in _families()
        for sample in family.samples
    }
    want = [
        ("echelon_audit_witness_checks", (("outcome", "inconsistent"),)),
        ("echelon_audit_witness_checks", (("outcome", "unreachable"),)),
        ("echelon_coordinator_windows", (("outcome", "aborted"),)),
        (
            "echelon_audit_appends",
            (("payload_type", "MASKED_DELTA"), ("verdict", "refused")),
        ),
        ("echelon_coordinator_secagg_stage_seconds", (("stage", "unmask"),)),
    ]
    names = {name for name, _ in samples}
    for name, labels in want:
        assert name in names, name
        assert any(n == name and set(labels) <= set(lab) for n, lab in samples), (name, labels)
