"""Contribution vectors: the agent's sum carries the token-weighted average and the weight."""

from __future__ import annotations

import numpy as np
import pytest

from echelon.device.contribution import (
    ContributionRejected,
    ContributionSum,
    encode_contribution,
)


def test_sum_gives_token_weighted_average() -> None:
    rng = np.random.default_rng(0)
    theta_v = rng.normal(size=10).astype(np.float32)
    thetas = [rng.normal(size=10).astype(np.float32) for _ in range(3)]
    tokens = [100, 300, 600]
    losses = [3.0, 2.0, 1.0]
    total = ContributionSum(10)

    for shard, (theta, t, loss) in enumerate(zip(thetas, tokens, losses, strict=True)):
        total.add(shard, encode_contribution(theta_v, theta, tokens=t, train_loss=loss))

    expected = sum(
        t * (theta_v.astype(np.float64) - th) for th, t in zip(thetas, tokens, strict=True)
    )
    assert total.count == 3
    assert total.weight_sum == 1000.0
    assert np.allclose(total.delta_sum / total.weight_sum, expected / 1000.0)
    assert total.mean_train_loss == pytest.approx((300 + 600 + 600) / 1000)


def test_rejects_mismatched_vectors() -> None:
    with pytest.raises(ValueError, match="want theta_v"):
        encode_contribution(np.zeros(3), np.zeros(4), tokens=1, train_loss=0.0)
    total = ContributionSum(3)
    with pytest.raises(ContributionRejected, match="want float64"):
        total.add(0, encode_contribution(np.zeros(4), np.zeros(4), tokens=1, train_loss=0.0))
