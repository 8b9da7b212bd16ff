"""The window driver on small hand-built settings: staleness, faults, delay-aware overlap."""

from __future__ import annotations

import itertools
from dataclasses import replace

from echelon.sim.config import SimConfig, World
from echelon.sim.driver import simulate
from echelon.sim.network import FaultConfig, Interval, LinkConfig
from echelon.staleness import StalenessConfig, StalenessKind, contribution_weight
from echelon.strategy import strategy


def test_sync_windows_wait_for_everyone_and_are_never_stale(world: World, sim: SimConfig) -> None:
    result = simulate(world, sim, strategy("diloco-sa", inner_steps=2))

    points = result.points[1:]
    assert points and all(p.staleness == 0 for p in points)
    assert [p.syncs for p in points] == list(range(1, len(points) + 1))
    assert all(a.bytes < b.bytes and a.wall_s < b.wall_s for a, b in itertools.pairwise(points))
    assert points[-1].tokens >= sim.token_budget


def test_semi_async_deadline_makes_the_slow_boundary_stale(world: World, sim: SimConfig) -> None:
    slow = replace(sim, speeds=(1.0, 1.0, 0.05), boundaries=3, token_budget=4608)
    echelon = strategy("echelon", inner_steps=2, controller=None, deadline_factor=1.2)

    result = simulate(world, slow, echelon)

    assert max(p.staleness for p in result.points) >= 1
    assert result.points[-1].tokens >= slow.token_budget


def test_staleness_weights_follow_the_history() -> None:
    # A boundary's contributions land 0, 1, 2 and 5 versions behind; tau_max = 4 drops the last.
    cfg = StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=4)
    history = [0, 1, 2, 5]

    weights = [contribution_weight(512, tau, cfg, token_unit=512.0) for tau in history]

    assert weights[:3] == [1.0, 2**-0.5, 3**-0.5]
    assert weights[3] is None


def test_outage_and_partition_do_not_stall_the_run(world: World, sim: SimConfig) -> None:
    faults = FaultConfig(
        outages=(Interval(boundary=1, start_s=0.05, end_s=2.0),),
        partitions=(Interval(boundary=0, start_s=2.5, end_s=3.0),),
    )
    result = simulate(world, replace(sim, faults=faults), strategy("diloco", inner_steps=2))

    assert result.points[-1].tokens >= sim.token_budget
    assert result.points[-1].wall_s > 2.0


def test_churn_below_k_min_refuses_exports_but_the_run_goes_on(
    world: World, sim: SimConfig
) -> None:
    churned = replace(sim, faults=FaultConfig(churn=0.4), token_budget=2048)

    result = simulate(world, churned, strategy("echelon", inner_steps=2))

    assert result.points[-1].tokens >= churned.token_budget
    assert result.points[-1].syncs >= 1


def test_delay_aware_overlaps_wan_latency(world: World, sim: SimConfig) -> None:
    # Boundaries already train while the key rounds run (0.55 s from a commit at 50 ms), so
    # overlap pays when compute is longer than that: 32 steps, 1.0 s.
    wan = replace(sim, link=LinkConfig(latency_s=0.05), token_budget=32768)

    plain = simulate(world, wan, strategy("echelon", inner_steps=32, controller=None))
    overlapped = simulate(world, wan, strategy("echelon-da", inner_steps=32, controller=None))

    per_token = [r.points[-1].wall_s / r.points[-1].tokens for r in (plain, overlapped)]
    assert per_token[1] < 0.9 * per_token[0]


def test_buffered_and_local_strategies_run(world: World, sim: SimConfig) -> None:
    fedbuff = simulate(world, sim, strategy("fedbuff", inner_steps=2))
    local = simulate(world, sim, strategy("local-only", inner_steps=2))

    assert fedbuff.points[-1].syncs >= 2
    assert local.points[-1].bytes == 0 and local.points[-1].syncs == 0
    assert local.points[-1].tokens >= sim.token_budget


def test_prekeying_hides_the_next_windows_key_set_up(world: World, sim: SimConfig) -> None:
    wan = replace(sim, link=LinkConfig(latency_s=0.2), token_budget=2048)
    keyed_late = simulate(
        world, wan, strategy("echelon-da", inner_steps=2, controller=None, prekey=False)
    )
    pre_keyed = simulate(world, wan, strategy("echelon-da", inner_steps=2, controller=None))

    assert pre_keyed.points[-1].wall_s < keyed_late.points[-1].wall_s
