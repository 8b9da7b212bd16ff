"""Staleness weights on hand-computed values, and the tau_max cut-off."""

from __future__ import annotations

import pytest

from echelon.staleness import (
    StalenessConfig,
    StalenessKind,
    contribution_weight,
    staleness_factor,
)


def test_polynomial_staleness_is_inverse_power_of_one_plus_tau() -> None:
    cfg = StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.5, tau_max=10)

    assert staleness_factor(0, cfg) == 1.0
    assert staleness_factor(3, cfg) == pytest.approx(0.5)  # (1 + 3) ** -0.5
    assert staleness_factor(8, cfg) == pytest.approx(1 / 3)  # (1 + 8) ** -0.5


def test_hinge_staleness_is_flat_up_to_the_knee_then_decays() -> None:
    cfg = StalenessConfig(kind=StalenessKind.HINGE, a=0.5, b=2, tau_max=10)

    assert staleness_factor(0, cfg) == 1.0
    assert staleness_factor(2, cfg) == 1.0
    assert staleness_factor(4, cfg) == pytest.approx(0.5)  # 1 / (0.5 * (4 - 2) + 1)
    assert staleness_factor(8, cfg) == pytest.approx(0.25)  # 1 / (0.5 * 6 + 1)


def test_constant_staleness_ignores_tau() -> None:
    cfg = StalenessConfig(kind=StalenessKind.CONSTANT, tau_max=5)

    assert [staleness_factor(t, cfg) for t in range(6)] == [1.0] * 6


@pytest.mark.parametrize("kind", list(StalenessKind))
def test_beyond_tau_max_the_contribution_is_dropped(kind: StalenessKind) -> None:
    cfg = StalenessConfig(kind=kind, tau_max=3)

    assert staleness_factor(3, cfg) is not None
    assert staleness_factor(4, cfg) is None
    assert contribution_weight(1000, 4, cfg, token_unit=100.0) is None


def test_contribution_weight_scales_tokens_by_staleness() -> None:
    cfg = StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=1.0, tau_max=10)

    assert contribution_weight(2048, 1, cfg, token_unit=1024.0) == pytest.approx(1.0)  # 2 * 1/2
    assert contribution_weight(0, 0, cfg, token_unit=1024.0) == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: staleness_factor(-1, StalenessConfig()), "tau"),
        (lambda: contribution_weight(-5, 0, StalenessConfig(), 1.0), "tokens"),
        (lambda: contribution_weight(5, 0, StalenessConfig(), 0.0), "token_unit"),
        (lambda: StalenessConfig(a=-0.1), "StalenessConfig.a"),
        (lambda: StalenessConfig(tau_max=-1), "tau_max"),
    ],
)
def test_invalid_arguments_say_what_to_change(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
