"""The drift-aware sync controller on hand-built histories of window signals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from echelon.controller import (
    ControllerState,
    ControlReason,
    SyncControllerConfig,
    SyncSignals,
    agreement_ratio,
    cosine,
    decide,
    initial_state,
    relative_drift,
)

CFG = SyncControllerConfig(h_min=2, h_max=16, patience=2)


def calm(loss: float = 5.0) -> SyncSignals:
    return SyncSignals(drift=0.05, agreement=0.9, cosine=0.5, loss=loss)


def fold(history: list[SyncSignals], h: int = 4) -> list[tuple[int, ControlReason]]:
    state = initial_state(h, 0.0, CFG)
    out = []
    for signals in history:
        decision = decide(state, signals, CFG)
        out.append((decision.inner_steps, decision.reason))
        state = decision.state
    return out


def test_agreeing_windows_lengthen_h_after_patience_and_stop_at_h_max() -> None:
    history = [calm(5.0 - 0.01 * i) for i in range(12)]

    steps = [h for h, _ in fold(history)]

    assert steps[:4] == [4, 6, 6, 9]
    assert max(steps) == CFG.h_max
    assert steps[-1] == 16


def test_agreement_for_patience_windows_grows_h_and_says_why() -> None:
    state = ControllerState(inner_steps=4, loss_ema=5.0, drift_ref=0.05, calm_streak=1)

    decision = decide(state, calm(loss=4.99), CFG)

    assert (decision.inner_steps, decision.reason) == (6, ControlReason.AGREEMENT)
    assert decision.detail == "agreement 0.900 for 2 windows: H 4 -> 6"
    assert decision.state.calm_streak == 0


def test_disagreement_shortens_h_and_resets_the_calm_streak() -> None:
    history = [calm(5.0), SyncSignals(drift=0.05, agreement=0.1, cosine=0.5, loss=4.99), calm(4.98)]

    decisions = fold(history, h=8)

    assert decisions[1] == (4, ControlReason.DISAGREEMENT)
    assert decisions[2] == (4, ControlReason.CALM_WAITING)


def test_rising_loss_wins_over_agreement() -> None:
    state = ControllerState(inner_steps=8, mu=0.0, loss_ema=5.0, calm_streak=1)

    decision = decide(state, calm(loss=5.3), CFG)

    assert decision.reason is ControlReason.LOSS_RISING
    assert decision.inner_steps == 4
    assert "5.3000 > ema 5.0000" in decision.detail


def test_drift_is_judged_per_step_against_the_first_window() -> None:
    # A large first-window drift is this run's normal: it sets the reference, H holds.
    first = SyncSignals(drift=0.8, agreement=0.5, cosine=None, loss=5.0)
    # Twice the steps, twice the drift: the same per step; then 3x the reference per step.
    same = SyncSignals(drift=1.6, agreement=0.5, cosine=0.0, loss=4.99)
    faster = SyncSignals(drift=4.8, agreement=0.5, cosine=0.0, loss=4.98)
    state = initial_state(8, 0.0, CFG)

    d1 = decide(state, first, CFG)
    d2 = decide(replace(d1.state, inner_steps=16), same, CFG)
    d3 = decide(d2.state, faster, CFG)

    assert (d1.inner_steps, d1.reason, d1.state.drift_ref) == (8, ControlReason.FIRST, 0.1)
    assert d2.reason is ControlReason.HOLD
    assert (d3.inner_steps, d3.reason) == (8, ControlReason.DRIFT_HIGH)
    assert "0.3000 > 2.0 x first window's 0.1000" in d3.detail


def test_high_drift_and_direction_flip_shorten_h() -> None:
    state = ControllerState(inner_steps=8, loss_ema=5.0, drift_ref=0.01)
    drift = SyncSignals(drift=2.0, agreement=0.9, cosine=0.5, loss=4.9)
    flip = SyncSignals(drift=0.1, agreement=0.9, cosine=-0.8, loss=4.9)

    assert decide(state, drift, CFG).reason is ControlReason.DRIFT_HIGH
    assert decide(state, flip, CFG).reason is ControlReason.DIRECTION_FLIP
    assert decide(state, flip, CFG).inner_steps == 4


def test_h_never_leaves_its_bounds() -> None:
    shrinking = [SyncSignals(drift=9.0, agreement=0.0, cosine=-1.0, loss=5.0)] * 6

    steps = [h for h, _ in fold(shrinking, h=16)]

    assert steps == [8, 4, 2, 2, 2, 2]


def test_mu_adapts_only_when_enabled() -> None:
    cfg = SyncControllerConfig(h_min=2, h_max=16, adapt_mu=True, mu_min=1e-3, mu_max=4e-3)
    state = ControllerState(inner_steps=8, mu=0.0, loss_ema=5.0)
    bad = SyncSignals(drift=0.1, agreement=0.1, cosine=0.0, loss=5.0)

    mus = []
    for _ in range(4):
        decision = decide(state, bad, cfg)
        state = decision.state
        mus.append(decision.mu)

    assert mus == [1e-3, 2e-3, 4e-3, 4e-3]
    assert decide(ControllerState(inner_steps=8, mu=0.0), bad, CFG).mu == 0.0


def test_hold_in_the_middle_band() -> None:
    state = ControllerState(inner_steps=8, loss_ema=5.0, calm_streak=1)
    middle = SyncSignals(drift=0.1, agreement=0.45, cosine=0.0, loss=4.95)

    decision = decide(state, middle, CFG)

    assert (decision.inner_steps, decision.reason) == (8, ControlReason.HOLD)
    assert decision.state.calm_streak == 0


def test_config_and_signals_validate() -> None:
    with pytest.raises(ValueError, match="h_min"):
        SyncControllerConfig(h_min=10, h_max=4)
    with pytest.raises(ValueError, match="finite"):
        SyncSignals(drift=float("nan"), agreement=0.5, cosine=None, loss=1.0)


def test_signal_helpers() -> None:
    a = np.array([1.0, 0.0], dtype=np.float32)
    b = np.array([-1.0, 0.0], dtype=np.float32)

    assert agreement_ratio(a + b, 2.0) == 0.0
    assert agreement_ratio(a + a, 2.0) == pytest.approx(1.0)
    assert cosine(None, a) is None
    assert cosine(a, b) == pytest.approx(-1.0)
    assert relative_drift(a, np.zeros(2, dtype=np.float32)) == pytest.approx(1.0)
    assert relative_drift(a, np.full(2, 10.0, dtype=np.float32)) == pytest.approx(1 / 200**0.5)
