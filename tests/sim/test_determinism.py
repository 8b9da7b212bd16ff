"""Same seed, same losses to the bit on CPU; the secure-aggregation path included."""

from __future__ import annotations

from dataclasses import replace

from echelon.sim.config import SimConfig, World
from echelon.sim.driver import simulate
from echelon.sim.network import LinkConfig
from echelon.strategy import strategy


def test_same_seed_gives_bit_identical_trajectories(world: World, sim: SimConfig) -> None:
    cfg = replace(sim, link=LinkConfig(latency_s=0.1))
    echelon_da = strategy("echelon-da", inner_steps=2)

    first = simulate(world, cfg, echelon_da)
    second = simulate(world, cfg, echelon_da)

    assert len(first.points) >= 3
    assert [p.loss for p in first.points] == [p.loss for p in second.points]
    assert first.points == second.points


def test_another_seed_gives_another_trajectory(world: World, sim: SimConfig) -> None:
    diloco = strategy("diloco", inner_steps=2)

    a = simulate(world, sim, diloco)
    b = simulate(world, replace(sim, seed=1), diloco)

    assert [p.loss for p in a.points[1:]] != [p.loss for p in b.points[1:]]
