"""Participation-window decisions: who joins a cohort, when a window closes, whether to unmask.

Each decision is a pure function of (now, state, config) returning the decision and
a reason string, so the coordinator service and the simulator share them and tests
build states by hand. Times are seconds on whatever clock the caller uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    """How windows are formed and closed (FedBuff-style buffering with a deadline)."""

    inner_steps: int = 20  # H of the first window; the sync controller may change it later
    deadline_s: float = 120.0  # a window closes at the latest this long after it opens
    buffer_k: int = 0  # close once K contributions are buffered; 0 = wait for the whole cohort
    m_min: int = 2  # fewer contributions are never unmasked; they roll over
    min_cohort: int = 2  # a window opens only with at least this many live boundaries
    liveness_s: float = 30.0  # a boundary silent for longer leaves the next cohort

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"WindowConfig.inner_steps: got {self.inner_steps}, want >= 1")
        if not self.deadline_s > 0:
            raise ValueError(f"WindowConfig.deadline_s: got {self.deadline_s}, want > 0")
        if self.m_min < 1:
            raise ValueError(f"WindowConfig.m_min: got {self.m_min}, want >= 1 (default 2)")
        if self.min_cohort < self.m_min:
            raise ValueError(
                f"WindowConfig.min_cohort: got {self.min_cohort}, want >= m_min = {self.m_min}"
            )
        if self.buffer_k != 0 and self.buffer_k < self.m_min:
            raise ValueError(
                f"WindowConfig.buffer_k: got {self.buffer_k}, want 0 (whole cohort) or >= m_min "
                f"= {self.m_min}"
            )
        if not self.liveness_s > 0:
            raise ValueError(f"WindowConfig.liveness_s: got {self.liveness_s}, want > 0")


@dataclass(frozen=True)
class BoundarySeen:
    """What the coordinator knows of a registered boundary's liveness."""

    boundary: str
    last_seen_s: float


@dataclass(frozen=True)
class CohortDecision:
    members: tuple[str, ...]
    open_window: bool
    reason: str


def select_cohort(
    now_s: float, seen: Sequence[BoundarySeen], config: WindowConfig
) -> CohortDecision:
    """The live boundaries (seen within `liveness_s`), sorted, and whether a window may open."""
    live = tuple(sorted(b.boundary for b in seen if now_s - b.last_seen_s <= config.liveness_s))
    if len(live) < config.min_cohort:
        return CohortDecision(
            live, False, f"{len(live)} live of {len(seen)} registered, need {config.min_cohort}"
        )
    return CohortDecision(live, True, f"{len(live)} live boundaries")


class CloseReason(Enum):
    BUFFER_FULL = "buffer_full"
    ALL_ANSWERED = "all_answered"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class CloseDecision:
    close: bool
    reason: CloseReason | None
    detail: str


def close_decision(
    now_s: float,
    *,
    opened_s: float,
    cohort_size: int,
    collected: int,
    failed: int,
    config: WindowConfig,
) -> CloseDecision:
    """Whether collection ends: K buffered, everyone answered (or failed), or the deadline."""
    target = cohort_size if config.buffer_k == 0 else min(config.buffer_k, cohort_size)
    if collected >= target:
        return CloseDecision(
            True, CloseReason.BUFFER_FULL, f"{collected} contributions buffered, K = {target}"
        )
    if collected + failed >= cohort_size:
        return CloseDecision(
            True,
            CloseReason.ALL_ANSWERED,
            f"{collected} collected, {failed} failed of {cohort_size}",
        )
    # The same sum as the deadline timer's (opened + deadline): a subtraction can round
    # below deadline_s when the timer fires exactly on time, and the window never closes.
    if now_s >= opened_s + config.deadline_s:
        return CloseDecision(
            True, CloseReason.DEADLINE, f"deadline {config.deadline_s:.1f}s passed with {collected}"
        )
    return CloseDecision(False, None, f"{collected}/{target} buffered")


@dataclass(frozen=True)
class UnmaskDecision:
    unmask: bool
    reason: str


def unmask_decision(contributions: int, config: WindowConfig) -> UnmaskDecision:
    """A window is unmasked only with at least m_min contributions; else they roll over."""
    if contributions < config.m_min:
        return UnmaskDecision(
            False, f"{contributions} contributions < m_min = {config.m_min}: roll over"
        )
    return UnmaskDecision(True, f"{contributions} contributions >= m_min = {config.m_min}")
