"""An organization's own floor: a declaration or a window weaker than it is refused with a
sentence that says what was offered and what is required, and a boundary core with a floor
declines such windows while the others go on without it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from echelon.declaration import (
    ModelIdentity,
    RunDeclaration,
    SecureAggregationConfig,
    WindowConfig,
)
from echelon.floor import LocalFloor, declaration_shortfalls, window_shortfalls
from tests.protocol.harness import make_world, protocol_config

MODEL = ModelIdentity(bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32, 4096)
STRICT = LocalFloor(
    min_k_min=3,
    min_m_min=3,
    require_level1=True,
    require_level2=True,
    min_threshold_fraction=0.6,
    max_inner_steps=32,
)


def test_a_declaration_at_the_floor_passes() -> None:
    decl = RunDeclaration(
        run_id="r",
        model=MODEL,
        secagg=SecureAggregationConfig(k_min=3, threshold_fraction=0.6),
        window=WindowConfig(inner_steps=32, m_min=3, min_cohort=3),
    )
    assert declaration_shortfalls(decl, STRICT) == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"secagg": SecureAggregationConfig(k_min=2, threshold_fraction=0.6)}, "k_min 2 is below"),
        (
            {"secagg": SecureAggregationConfig(k_min=3, level1=False, threshold_fraction=0.6)},
            "level 1",
        ),
        ({"secagg": SecureAggregationConfig(k_min=3, level2=False)}, "level 2"),
        ({"secagg": SecureAggregationConfig(k_min=3, threshold_fraction=0.5)}, "threshold"),
        ({"window": WindowConfig(inner_steps=64, m_min=3, min_cohort=3)}, "H up to 64"),
        ({"window": WindowConfig(inner_steps=32, m_min=2, min_cohort=2)}, "m_min 2 is below"),
        ({"adaptive_h": True}, "H up to 64"),  # the controller may lengthen H to h_max
    ],
)
def test_a_weaker_declaration_is_refused_and_says_why(change: dict[str, object], says: str) -> None:
    decl = RunDeclaration(
        run_id="r",
        model=MODEL,
        secagg=SecureAggregationConfig(k_min=3, threshold_fraction=0.6),
        window=WindowConfig(inner_steps=32, m_min=3, min_cohort=3),
    )
    found = declaration_shortfalls(replace(decl, **change), STRICT)  # type: ignore[arg-type]
    assert len(found) == 1 and says in found[0]


def test_window_checks_cohort_size_peers_and_h() -> None:
    floor = LocalFloor(min_m_min=3, max_inner_steps=8, allowed_peers=frozenset({"b", "c"}))
    assert window_shortfalls(["a", "b", "c"], 8, floor, own="a") == []
    assert window_shortfalls(["a", "b", "c"], None, floor, own="a") == []  # H not known yet
    found = window_shortfalls(["a", "b", "x"], 9, floor, own="a")
    assert any("x, not among the allowed peers" in f for f in found)
    assert any("H 9 is above" in f for f in found)
    assert window_shortfalls(["a", "b"], 8, floor, own="a") == [
        "a cohort of 2 (a, b) is below this organization's m_min 3"
    ]


def test_bad_floors_are_refused() -> None:
    with pytest.raises(ValueError, match="min_m_min"):
        LocalFloor(min_m_min=1)
    with pytest.raises(ValueError, match="min_threshold_fraction"):
        LocalFloor(min_threshold_fraction=1.0)


def test_a_boundary_below_its_floor_declines_and_the_others_go_on() -> None:
    # org-c agrees to be summed with org-a only; every cohort also names org-b.
    world = make_world(config=protocol_config(windows=2))
    world.boundaries["org-c"].floor = LocalFloor(allowed_peers=frozenset({"org-a"}))

    trace = world.run()

    committed = [o for o in trace.outcomes if o.committed]
    assert len(committed) == 2
    assert all(o.contributors == ("org-a", "org-b") for o in committed)
    refusals = [n for n in trace.notes if n.party == "org-c" and n.kind == "refused"]
    assert refusals and all("org-b, not among the allowed peers" in n.reason for n in refusals)
