"""The drift-aware outer sync controller: picks the next window's inner step count H (and,
optionally, the proximal weight mu) from O(1) signals of the window that just closed.

`decide(state, signals, config)` is a pure function; the coordinator and the simulator fold it
over windows and log and export each decision's reason. Signals (all scalars):

- relative drift `max_b ||theta_b - theta_v|| / max(||theta_v||, floor)` over contributors,
  judged per inner step against the run's first window (the reference: what drift is normal
  for this model, data and learning rate is not known in advance),
- agreement ratio `||sum_b w_b delta_b|| / sum_b w_b ||delta_b||` in [0, 1] (1: all agree),
- cosine between this window's global pseudo-gradient and the previous one's,
- the contributors' weighted mean training loss (its trend against an EMA).

Boundaries that diverge (high drift, low agreement, pseudo-gradients that flip direction, a
rising loss) get a shorter H; windows that agree for `patience` windows in a row get a longer
one, so that communication is spent where it buys quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np


class ControlReason(Enum):
    """Why H changed or held; exported as a metric label."""

    FIRST = "first"
    LOSS_RISING = "loss_rising"
    DRIFT_HIGH = "drift_high"
    DISAGREEMENT = "disagreement"
    DIRECTION_FLIP = "direction_flip"
    AGREEMENT = "agreement"
    CALM_WAITING = "calm_waiting"
    HOLD = "hold"


@dataclass(frozen=True, kw_only=True)
class SyncControllerConfig:
    """Bounds on H and mu, the thresholds on each signal, and how fast H moves."""

    h_min: int = 8
    h_max: int = 64
    grow: float = 1.5
    shrink: float = 0.5
    patience: int = 2
    drift_high: float = 2.0  # shrink when drift per step > drift_high x the first window's
    agreement_low: float = 0.3
    agreement_high: float = 0.6
    cosine_low: float = -0.2
    cosine_high: float = 0.2
    loss_beta: float = 0.5
    loss_rise: float = 0.02
    adapt_mu: bool = False
    mu_min: float = 1e-4
    mu_max: float = 1e-1

    def __post_init__(self) -> None:
        if not 1 <= self.h_min <= self.h_max:
            raise ValueError(
                f"SyncControllerConfig: got h_min={self.h_min}, h_max={self.h_max}; "
                "want 1 <= h_min <= h_max"
            )
        if not self.grow > 1.0 or not 0.0 < self.shrink < 1.0:
            raise ValueError(
                f"SyncControllerConfig: got grow={self.grow}, shrink={self.shrink}; "
                "want grow > 1 and 0 < shrink < 1"
            )
        if self.patience < 1:
            raise ValueError(f"SyncControllerConfig.patience: got {self.patience}, want >= 1")
        if not 0.0 <= self.agreement_low <= self.agreement_high <= 1.0:
            raise ValueError(
                f"SyncControllerConfig: got agreement_low={self.agreement_low}, "
                f"agreement_high={self.agreement_high}; want 0 <= low <= high <= 1"
            )
        if not -1.0 <= self.cosine_low <= self.cosine_high <= 1.0:
            raise ValueError(
                f"SyncControllerConfig: got cosine_low={self.cosine_low}, "
                f"cosine_high={self.cosine_high}; want -1 <= low <= high <= 1"
            )
        if not self.drift_high > 0 or not 0.0 <= self.loss_beta < 1.0 or self.loss_rise < 0:
            raise ValueError(
                "SyncControllerConfig: want drift_high > 0 (a ratio), 0 <= loss_beta < 1, "
                "loss_rise >= 0"
            )
        if not 0.0 < self.mu_min <= self.mu_max:
            raise ValueError(
                f"SyncControllerConfig: got mu_min={self.mu_min}, mu_max={self.mu_max}; "
                "want 0 < mu_min <= mu_max"
            )


@dataclass(frozen=True, kw_only=True)
class ControllerState:
    """What the controller carries between windows: O(1) scalars."""

    inner_steps: int
    mu: float = 0.0
    loss_ema: float | None = None
    calm_streak: int = 0
    drift_ref: float | None = None  # drift per inner step in the first window

    def __post_init__(self) -> None:
        if self.drift_ref is not None and not self.drift_ref >= 0:
            raise ValueError(f"ControllerState.drift_ref: got {self.drift_ref}, want >= 0")
        if self.inner_steps < 1 or self.mu < 0 or self.calm_streak < 0:
            raise ValueError(
                f"ControllerState: got inner_steps={self.inner_steps}, mu={self.mu}, "
                f"calm_streak={self.calm_streak}; want >= 1, >= 0, >= 0"
            )


@dataclass(frozen=True, kw_only=True)
class SyncSignals:
    """The O(1) signals of one closed window."""

    drift: float
    agreement: float
    cosine: float | None
    loss: float

    def __post_init__(self) -> None:
        finite = [self.drift, self.agreement, self.loss]
        if self.cosine is not None:
            finite.append(self.cosine)
        if not all(math.isfinite(x) for x in finite):
            raise ValueError(f"SyncSignals: got {self}, want finite values")


@dataclass(frozen=True)
class ControlDecision:
    """The next window's H and mu, why, and the controller's next state."""

    inner_steps: int
    mu: float
    reason: ControlReason
    detail: str
    state: ControllerState


def _clamp_h(h: float, cfg: SyncControllerConfig) -> int:
    return max(cfg.h_min, min(cfg.h_max, round(h)))


def decide(
    state: ControllerState, signals: SyncSignals, config: SyncControllerConfig
) -> ControlDecision:
    """The next window's (H, mu, reason) from the last window's signals; pure."""
    cfg = config
    ema = state.loss_ema
    if ema is None:
        next_ema = signals.loss
    else:
        next_ema = cfg.loss_beta * ema + (1.0 - cfg.loss_beta) * signals.loss
    h, mu = state.inner_steps, state.mu
    per_step = signals.drift / h
    ref = state.drift_ref if state.drift_ref is not None else per_step
    shrink_reason: tuple[ControlReason, str] | None = None
    if ema is not None and signals.loss > ema * (1.0 + cfg.loss_rise):
        shrink_reason = (
            ControlReason.LOSS_RISING,
            f"loss {signals.loss:.4f} > ema {ema:.4f} x (1 + {cfg.loss_rise})",
        )
    if shrink_reason is None and ref > 0 and per_step > cfg.drift_high * ref:
        shrink_reason = (
            ControlReason.DRIFT_HIGH,
            f"drift per step {per_step:.4f} > {cfg.drift_high} x first window's {ref:.4f}",
        )
    if shrink_reason is None and signals.agreement < cfg.agreement_low:
        shrink_reason = (
            ControlReason.DISAGREEMENT,
            f"agreement {signals.agreement:.3f} < {cfg.agreement_low}",
        )
    if shrink_reason is None and signals.cosine is not None and signals.cosine < cfg.cosine_low:
        shrink_reason = (
            ControlReason.DIRECTION_FLIP,
            f"cosine {signals.cosine:.3f} < {cfg.cosine_low}",
        )

    def decision(
        new_h: int, new_mu: float, reason: ControlReason, detail: str, streak: int = 0
    ) -> ControlDecision:
        nxt = ControllerState(
            inner_steps=new_h, mu=new_mu, loss_ema=next_ema, calm_streak=streak, drift_ref=ref
        )
        return ControlDecision(new_h, new_mu, reason, detail, nxt)

    if shrink_reason is not None:
        reason, detail = shrink_reason
        new_h = _clamp_h(h * cfg.shrink, cfg)
        if cfg.adapt_mu:
            mu = min(cfg.mu_max, max(cfg.mu_min, mu * 2.0))
        return decision(new_h, mu, reason, f"{detail}: H {h} -> {new_h}")
    calm = signals.agreement >= cfg.agreement_high and (
        signals.cosine is None or signals.cosine >= cfg.cosine_high
    )
    if not calm:
        reason = ControlReason.FIRST if ema is None else ControlReason.HOLD
        return decision(h, mu, reason, f"agreement {signals.agreement:.3f}: hold H {h}")
    streak = state.calm_streak + 1
    if streak < cfg.patience:
        detail = f"calm {streak}/{cfg.patience}: hold H {h}"
        return decision(h, mu, ControlReason.CALM_WAITING, detail, streak)
    new_h = _clamp_h(h * cfg.grow, cfg)
    if cfg.adapt_mu:
        mu = mu / 2.0 if mu / 2.0 >= cfg.mu_min else 0.0
    detail = f"agreement {signals.agreement:.3f} for {streak} windows: H {h} -> {new_h}"
    return decision(new_h, mu, ControlReason.AGREEMENT, detail)


def initial_state(inner_steps: int, mu: float, config: SyncControllerConfig) -> ControllerState:
    """The state before the first window: H clamped into [h_min, h_max]."""
    return ControllerState(inner_steps=_clamp_h(inner_steps, config), mu=mu)


def agreement_ratio(weighted_sum: np.ndarray, weighted_norms: float) -> float:
    """`||sum_b w_b delta_b|| / sum_b w_b ||delta_b||`; 1.0 when nothing moved."""
    if weighted_norms <= 0:
        return 1.0
    ratio = float(np.linalg.norm(weighted_sum.astype(np.float64))) / weighted_norms
    return min(1.0, ratio)


def cosine(a: np.ndarray | None, b: np.ndarray) -> float | None:
    """Cosine between successive pseudo-gradients; None without a previous one or a zero one."""
    if a is None:
        return None
    na = float(np.linalg.norm(a.astype(np.float64)))
    nb = float(np.linalg.norm(b.astype(np.float64)))
    if na == 0.0 or nb == 0.0:
        return None
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


def relative_drift(delta: np.ndarray, theta_v: np.ndarray, floor: float = 1.0) -> float:
    """`||delta|| / max(||theta_v||, floor)`; the floor keeps a zero-initialised B meaningful."""
    norm_v = float(np.linalg.norm(theta_v.astype(np.float64)))
    return float(np.linalg.norm(delta.astype(np.float64))) / max(norm_v, floor)
