"""The strategy registry: eight named compositions, checked overrides."""

from __future__ import annotations

import pytest

from echelon.strategy import STRATEGIES, SyncMode, strategy


def test_registry_names_the_eight_strategies_and_which_pre_key() -> None:
    assert list(STRATEGIES) == [
        "local-only",
        "fedavg",
        "fedprox",
        "fedbuff",
        "diloco",
        "diloco-sa",
        "echelon",
        "echelon-da",
    ]
    assert STRATEGIES["fedavg"].outer.lr == 1.0 and STRATEGIES["fedavg"].outer.momentum == 0.0
    assert (
        STRATEGIES["diloco-sa"].secure_aggregation and not STRATEGIES["diloco"].secure_aggregation
    )
    assert STRATEGIES["echelon-da"].delay_aware and STRATEGIES["echelon"].controller is not None
    assert STRATEGIES["fedbuff"].mode is SyncMode.BUFFERED
    # Echelon pre-keys as the services do (level 2 on); the baselines keep SecAgg's own rounds.
    assert STRATEGIES["echelon"].prekey and STRATEGIES["echelon-da"].prekey
    assert not STRATEGIES["diloco-sa"].prekey


def test_overrides_build_the_outer_optimizer() -> None:
    s = strategy("diloco", outer_lr=1.0, outer_momentum=0.0, inner_steps=8, frozen_a=True)

    assert (s.outer.lr, s.outer.momentum, s.outer.nesterov) == (1.0, 0.0, False)
    assert s.inner_steps == 8 and s.frozen_a


def test_invalid_compositions_are_refused() -> None:
    with pytest.raises(KeyError, match="want one of"):
        strategy("fedsgd")
    with pytest.raises(ValueError, match="buffered"):
        strategy("fedbuff", delay_aware=True)
    with pytest.raises(ValueError, match="local"):
        strategy("local-only", secure_aggregation=True)


def test_delay_aware_knobs_need_their_mechanisms() -> None:
    assert strategy("echelon-da", rebase_carry=0.5).rebase_carry == 0.5
    with pytest.raises(ValueError, match="rebase_carry"):
        strategy("echelon", rebase_carry=0.5)
    with pytest.raises(ValueError, match="prekey"):
        strategy("diloco", prekey=True)


def test_grow_h_false_caps_the_controller_at_the_first_h() -> None:
    capped = strategy("echelon", inner_steps=8, grow_h=False)
    free = strategy("echelon", inner_steps=8, grow_h=True)

    assert capped.controller is not None and free.controller is not None
    assert (capped.controller.h_min, capped.controller.h_max) == (2, 8)
    assert free.controller == STRATEGIES["echelon"].controller
    with pytest.raises(ValueError, match="needs a controller"):
        strategy("diloco-sa", grow_h=False)
