"""Links, fault schedules and byte sizes of the simulated WAN."""

from __future__ import annotations

import pytest

from echelon.sim.network import (
    FaultConfig,
    Interval,
    LinkConfig,
    arrival_s,
    compute_end,
    device_present,
    reachable_at,
    vector_bytes,
)


def test_transfer_is_latency_plus_serialisation() -> None:
    link = LinkConfig(latency_s=0.2, bandwidth_mbps=8.0)

    assert link.transfer_s(1_000_000) == pytest.approx(0.2 + 1.0)
    assert vector_bytes(10) == 44 + 64


def test_outage_pauses_compute_and_defers_messages() -> None:
    faults = FaultConfig(outages=(Interval(boundary=1, start_s=2.0, end_s=5.0),))
    link = LinkConfig(latency_s=0.1, bandwidth_mbps=1e6)

    assert compute_end(1, 0.0, 3.0, faults) == pytest.approx(6.0)
    assert compute_end(0, 0.0, 3.0, faults) == pytest.approx(3.0)
    assert reachable_at(1, 3.0, faults) == 5.0
    assert arrival_s(1, 3.0, 0, link, faults) == pytest.approx(5.1)


def test_partition_cuts_the_link_but_not_compute() -> None:
    faults = FaultConfig(partitions=({"boundary": 0, "start_s": 1.0, "end_s": 4.0},))  # type: ignore[arg-type]

    assert faults.partitions == (Interval(boundary=0, start_s=1.0, end_s=4.0),)
    assert compute_end(0, 0.0, 3.0, faults) == 3.0
    assert reachable_at(0, 2.0, faults) == 4.0


def test_churn_schedule_is_a_pure_function_of_ids() -> None:
    draws = [device_present(7, 0, d, c, 0.3) for d in range(3) for c in range(200)]

    assert draws == [device_present(7, 0, d, c, 0.3) for d in range(3) for c in range(200)]
    assert 0.6 < sum(draws) / len(draws) < 0.8
    assert all(device_present(7, 0, 0, c, 0.0) for c in range(10))
