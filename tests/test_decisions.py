"""The pure decision functions on hand-built states: each test asserts the decision and its
reason (an enum where the function has one, else the reason text), per STYLE "Decisions are
pure functions". The sync controller's reasons are in `sim/test_controller.py`, staleness in
`test_staleness.py`."""

from __future__ import annotations

import numpy as np
import pytest

from echelon.audit.policy import Policy
from echelon.audit.record import (
    Attributes,
    DeltaAttributes,
    MetadataAttributes,
    NoAttributes,
    PayloadType,
    Role,
)
from echelon.policy import ExportPolicy, ExportRefused, apply_export_policy
from echelon.window import (
    BoundarySeen,
    CloseDecision,
    CloseReason,
    WindowConfig,
    close_decision,
    select_cohort,
    unmask_decision,
)

pytestmark = pytest.mark.timeout(10)

WINDOW = WindowConfig(deadline_s=60.0, m_min=2, min_cohort=2, liveness_s=30.0)


# ---- cohort ---------------------------------------------------------------------------
def test_cohort_is_the_live_boundaries_sorted_and_opens_at_min_cohort() -> None:
    seen = [BoundarySeen("org-c", 95.0), BoundarySeen("org-a", 70.0), BoundarySeen("org-b", 60.0)]

    decision = select_cohort(100.0, seen, WINDOW)

    assert decision.open_window
    assert decision.members == ("org-a", "org-c")  # org-b: 40 s silent > liveness 30 s
    assert decision.reason == "2 live boundaries"


def test_cohort_below_min_cohort_does_not_open_and_says_how_many_live() -> None:
    seen = [BoundarySeen("org-a", 100.0), BoundarySeen("org-b", 10.0)]

    decision = select_cohort(100.0, seen, WINDOW)

    assert not decision.open_window
    assert decision.members == ("org-a",)
    assert decision.reason == "1 live of 2 registered, need 2"


# ---- closing a window -----------------------------------------------------------------
def _close(
    now_s: float, collected: int, failed: int, config: WindowConfig = WINDOW
) -> CloseDecision:
    return close_decision(
        now_s, opened_s=0.0, cohort_size=4, collected=collected, failed=failed, config=config
    )


def test_window_stays_open_while_answers_are_due_before_the_deadline() -> None:
    decision = _close(59.0, collected=2, failed=1)

    assert (decision.close, decision.reason) == (False, None)
    assert decision.detail == "2/4 buffered"


def test_window_closes_when_every_member_answered_or_failed() -> None:
    decision = _close(1.0, collected=3, failed=1)

    assert (decision.close, decision.reason) == (True, CloseReason.ALL_ANSWERED)
    assert decision.detail == "3 collected, 1 failed of 4"


def test_window_closes_at_the_deadline_with_what_it_has() -> None:
    decision = _close(60.0, collected=1, failed=0)

    assert (decision.close, decision.reason) == (True, CloseReason.DEADLINE)
    assert decision.detail == "deadline 60.0s passed with 1"


def test_buffered_window_closes_at_k_without_waiting_for_the_rest() -> None:
    buffered = WindowConfig(deadline_s=60.0, buffer_k=2)

    decision = _close(1.0, collected=2, failed=0, config=buffered)

    assert (decision.close, decision.reason) == (True, CloseReason.BUFFER_FULL)
    assert decision.detail == "2 contributions buffered, K = 2"


def test_buffer_full_wins_over_the_deadline() -> None:
    decision = _close(120.0, collected=4, failed=0)

    assert decision.reason is CloseReason.BUFFER_FULL
    assert decision.detail == "4 contributions buffered, K = 4"


# ---- unmasking ------------------------------------------------------------------------
def test_unmask_needs_m_min_contributions_else_they_roll_over() -> None:
    below, at = unmask_decision(1, WINDOW), unmask_decision(2, WINDOW)

    assert (below.unmask, below.reason) == (False, "1 contributions < m_min = 2: roll over")
    assert (at.unmask, at.reason) == (True, "2 contributions >= m_min = 2")


# ---- the boundary's export policy -----------------------------------------------------
EXPORT = ExportPolicy(k_min=2, clip_norm=1.0)


@pytest.mark.parametrize(
    ("delta", "devices", "reason"),
    [
        (np.zeros(4, np.float32), 1, "devices: got 1, want >= k_min = 2"),
        (np.zeros(3, np.float32), 2, "delta shape: got (3,), want (4,)"),
        (np.array([0, np.nan, 0, 0], np.float32), 2, "delta holds NaN or Inf"),
        (np.array([0, np.inf, 0, 0], np.float32), 2, "delta holds NaN or Inf"),
    ],
)
def test_export_policy_refuses_with_the_rule_that_failed(
    delta: np.ndarray, devices: int, reason: str
) -> None:
    with pytest.raises(ExportRefused) as refused:
        apply_export_policy(delta, devices=devices, dim=4, policy=EXPORT)

    assert str(refused.value) == reason


def test_export_policy_passes_a_small_delta_unchanged() -> None:
    delta = np.array([0.3, 0.4, 0.0, 0.0], np.float32)

    decision = apply_export_policy(delta, devices=2, dim=4, policy=EXPORT)

    assert not decision.clipped
    assert decision.norm_before == pytest.approx(0.5)
    np.testing.assert_array_equal(decision.delta, delta)


def test_export_policy_clips_a_large_delta_to_clip_norm() -> None:
    delta = np.array([3.0, 4.0, 0.0, 0.0], np.float32)

    decision = apply_export_policy(delta, devices=2, dim=4, policy=EXPORT)

    assert decision.clipped
    assert decision.norm_before == pytest.approx(5.0)
    np.testing.assert_allclose(decision.delta, [0.6, 0.8, 0.0, 0.0], rtol=1e-6)


# ---- the audit gate's allow-list --------------------------------------------------------
P = PayloadType
DELTA_OK = DeltaAttributes(cohort_size=2, devices=2)


@pytest.mark.parametrize(
    ("policy", "role", "payload_type", "schema", "size", "attributes", "reason"),
    [
        (Policy(), Role.BOUNDARY, P.UNSPECIFIED, 1, 1, NoAttributes(),
         "payload type UNSPECIFIED is not in the closed enum"),
        (Policy(), Role.BOUNDARY, P.GLOBAL_ADAPTER, 1, 1, NoAttributes(),
         "GLOBAL_ADAPTER is not allowed from a boundary"),
        (Policy(), Role.BOUNDARY, P.STATUS, 9, 1, NoAttributes(), "schema version 9 not in [1]"),
        (Policy(), Role.BOUNDARY, P.MASKED_DELTA, 1, -1, DELTA_OK,
         f"size -1 exceeds {Policy().payloads.max_bytes[P.MASKED_DELTA]} for MASKED_DELTA"),
        (Policy(), Role.BOUNDARY, P.PLAIN_DELTA, 1, 1, DELTA_OK,
         "PLAIN_DELTA while level-2 secure aggregation is declared on"),
        (Policy(), Role.BOUNDARY, P.MASKED_DELTA, 1, 1, DeltaAttributes(cohort_size=1, devices=2),
         "cohort of 1 boundaries, want >= m_min 2"),
        (Policy(level2=False), Role.BOUNDARY, P.PLAIN_DELTA, 1, 1,
         DeltaAttributes(cohort_size=2, devices=1), "sum over 1 devices, want >= k_min 2"),
        (Policy(), Role.BOUNDARY, P.WINDOW_METADATA, 1, 1,
         MetadataAttributes(fields=("devices", "per_device_loss")),
         "metadata fields ['per_device_loss'] are not WindowMetadata scalars"),
        (Policy(), Role.BOUNDARY, P.WINDOW_METADATA, 1, 1,
         MetadataAttributes(fields=("base_version", "drift")),
         "metadata fields ['drift'] are not WindowMetadata scalars"),
    ],
)  # fmt: skip
def test_audit_policy_refuses_with_the_rule_that_failed(
    policy: Policy,
    role: Role,
    payload_type: PayloadType,
    schema: int,
    size: int,
    attributes: Attributes,
    reason: str,
) -> None:
    got = policy.check(
        role=role, payload_type=payload_type, schema_version=schema, size=size,
        attributes=attributes,
    )  # fmt: skip

    assert got == reason


def test_audit_policy_lets_an_allowed_payload_cross() -> None:
    checks = [
        Policy().check(
            role=Role.BOUNDARY, payload_type=P.MASKED_DELTA, schema_version=1, size=64,
            attributes=DELTA_OK,
        ),
        Policy(level2=False).check(
            role=Role.BOUNDARY, payload_type=P.PLAIN_DELTA, schema_version=1, size=64,
            attributes=DELTA_OK,
        ),
        Policy().check(
            role=Role.COORDINATOR, payload_type=P.GLOBAL_ADAPTER, schema_version=1, size=64,
            attributes=NoAttributes(),
        ),
    ]  # fmt: skip

    assert checks == [None, None, None]
