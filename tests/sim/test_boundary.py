"""A simulated boundary: the delay-aware re-base and the export policy on its devices."""

from __future__ import annotations

import numpy as np
import pytest

from echelon.policy import ExportPolicy
from echelon.sim.boundary import SimBoundary
from echelon.sim.config import World
from echelon.sim.data import PartitionConfig, Skew, partition
from echelon.sim.network import FaultConfig, LinkConfig
from echelon.training.adapter import flatten
from echelon.training.inner import InnerConfig
from echelon.training.model import LoraConfig, build_model, lora_state


def _boundary(world: World, devices: int = 2) -> tuple[SimBoundary, np.ndarray]:
    vocab = world.corpus.tokenizer.vocab_size
    model, layout = build_model(world.model_cfg, LoraConfig(r=2, alpha=4), vocab)
    theta0 = flatten(lora_state(model, layout), layout)
    shards = partition(world.corpus.train, 2, devices, PartitionConfig(skew=Skew.IID), 0)
    inner = InnerConfig(lr=1e-2, warmup_steps=0, total_steps=100, batch_size=2, seq_len=32)
    bound = SimBoundary(
        index=0,
        model=model,
        layout=layout,
        shards=shards[0],
        inner=inner,
        speed_tokens_s=1000.0,
        link=LinkConfig(),
        seed=0,
        theta0=theta0,
    )
    return bound, theta0


@pytest.mark.parametrize("carry", [1.0, 0.5])
def test_rebase_moves_in_flight_progress_onto_the_new_version(world: World, carry: float) -> None:
    bound, theta0 = _boundary(world)
    bound.start_cycle(theta0, 0, FaultConfig())
    bound.train(2)
    submitted = bound.contribution(ExportPolicy(k_min=2))
    assert submitted is not None
    bound.begin_flight()
    bound.train(1)  # progress made while the window's communication is in flight
    progress = [dev.theta - dev.at_submit for dev in bound.devices if dev.at_submit is not None]
    theta_new = theta0 - submitted.delta

    bound.rebase(theta_new, 1, FaultConfig(), carry)

    assert bound.base_version == 1 and bound.steps_in_cycle == 1
    for dev, moved in zip(bound.devices, progress, strict=True):
        np.testing.assert_allclose(dev.theta, theta_new + np.float32(carry) * moved, atol=1e-7)


def test_export_is_refused_below_k_min(world: World) -> None:
    bound, theta0 = _boundary(world)
    bound.start_cycle(theta0, 0, FaultConfig())
    bound.devices[1].present = False
    bound.train(1)

    assert bound.contribution(ExportPolicy(k_min=2)) is None
    assert bound.contribution(ExportPolicy(k_min=1)) is not None
