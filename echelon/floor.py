"""An organization's own floor: the weakest run and window it will take part in.

The run's declaration (and, later, the signed manifest) says what every party runs; an
organization may still want more: a larger k_min, level 1 on, a higher Shamir threshold,
a bound on H (how many steps of its devices a single delta may carry), and the peers it
agrees to be summed with. `declaration_shortfalls` checks a declaration against the floor
before the organization joins a run; `window_shortfalls` checks each window the
coordinator opens (its cohort and H), so that a coordinator cannot go below the floor
later either. Each shortfall is a sentence that says what was offered and what the
organization requires; an empty list means the floor holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the declaration builds the protocol's configuration, whose core uses this
    from echelon.declaration import RunDeclaration


@dataclass(frozen=True, kw_only=True)
class LocalFloor:
    """`min_k_min`: the least devices in any sum this organization exports (level 1);
    `min_m_min`: the least boundaries in a sum the coordinator may unmask (level 2), and so
    in a window's cohort; `require_level1`/`require_level2`: the levels that must be on;
    `min_threshold_fraction`: the least Shamir threshold fraction at level 2;
    `max_inner_steps`: the most inner steps H of one window (None: no bound);
    `allowed_peers`: the only organizations it may be summed with (None: any the
    manifest names). The defaults add nothing to what the run declares: an organization
    states its own floor in the agent's `[floor]` table."""

    min_k_min: int = 1
    min_m_min: int = 2
    require_level1: bool = False
    require_level2: bool = False
    min_threshold_fraction: float = 0.0
    max_inner_steps: int | None = None
    allowed_peers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.min_k_min < 1:
            raise ValueError(f"LocalFloor.min_k_min: got {self.min_k_min}, want >= 1")
        if self.min_m_min < 2:
            raise ValueError(
                f"LocalFloor.min_m_min: got {self.min_m_min}, want >= 2 (a sum over one "
                "boundary is its delta)"
            )
        if not 0.0 <= self.min_threshold_fraction < 1.0:
            raise ValueError(
                "LocalFloor.min_threshold_fraction: got "
                f"{self.min_threshold_fraction}, want in [0, 1)"
            )
        if self.max_inner_steps is not None and self.max_inner_steps < 1:
            raise ValueError(
                f"LocalFloor.max_inner_steps: got {self.max_inner_steps}, want >= 1 or None"
            )
        if self.allowed_peers is not None and not isinstance(self.allowed_peers, frozenset):
            object.__setattr__(self, "allowed_peers", frozenset(self.allowed_peers))


def declaration_shortfalls(declaration: RunDeclaration, floor: LocalFloor) -> list[str]:
    """Where `declaration` is weaker than `floor` (empty: it may be joined)."""
    sa = declaration.secagg
    found = []
    if sa.k_min < floor.min_k_min:
        found.append(f"k_min {sa.k_min} is below this organization's {floor.min_k_min}")
    if declaration.window.m_min < floor.min_m_min:
        found.append(
            f"m_min {declaration.window.m_min} is below this organization's {floor.min_m_min}"
        )
    if floor.require_level1 and not sa.level1:
        found.append(
            "level 1 (secure aggregation between devices) is off; this organization requires it"
        )
    if floor.require_level2 and not sa.level2:
        found.append(
            "level 2 (secure aggregation between boundaries) is off; this organization requires it"
        )
    if sa.level2 and sa.threshold_fraction < floor.min_threshold_fraction:
        found.append(
            f"threshold fraction {sa.threshold_fraction} is below this organization's "
            f"{floor.min_threshold_fraction}"
        )
    h = declaration.window.inner_steps
    h_max = declaration.controller.h_max if declaration.adaptive_h else h
    if floor.max_inner_steps is not None and max(h, h_max) > floor.max_inner_steps:
        found.append(
            f"H up to {max(h, h_max)} is above this organization's {floor.max_inner_steps}"
        )
    return found


def window_shortfalls(
    cohort: Iterable[str], inner_steps: int | None, floor: LocalFloor, *, own: str
) -> list[str]:
    """Where one window (its cohort, and H once the window opens) is weaker than `floor`
    (empty: take part)."""
    members = sorted(set(cohort))
    found = []
    if len(members) < floor.min_m_min:
        found.append(
            f"a cohort of {len(members)} ({', '.join(members)}) is below this organization's "
            f"m_min {floor.min_m_min}"
        )
    if floor.allowed_peers is not None:
        strangers = [m for m in members if m != own and m not in floor.allowed_peers]
        if strangers:
            found.append(f"the cohort names {', '.join(strangers)}, not among the allowed peers")
    h_max = floor.max_inner_steps
    if h_max is not None and inner_steps is not None and inner_steps > h_max:
        found.append(f"H {inner_steps} is above this organization's {h_max}")
    return found
