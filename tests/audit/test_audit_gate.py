"""The log's append rules and the egress gate's policy, in-process over a LocalSink."""

from __future__ import annotations

import threading

import pytest
from audit_helpers import (
    COORDINATOR,
    Clock,
    declaration_bytes,
    memory_log,
    registered_gate,
    run_exchange,
)

from echelon.audit import (
    LOG_PARTY,
    AuditRecord,
    ConfigError,
    CounterReplay,
    DeltaAttributes,
    Direction,
    EgressGate,
    KeyConflict,
    KeyRegistration,
    LocalSink,
    MetadataAttributes,
    NoAttributes,
    PayloadType,
    Policy,
    PolicyViolation,
    RecordError,
    Role,
    SecAggLevels,
    SignatureError,
    Signer,
    UnknownSigner,
    Verdict,
)
from echelon.audit.verify import verify_log
from echelon.declaration import RunDeclaration


def _status(signer: Signer, counter: int, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "counter": counter, "time_ms": 1, "window": 0, "sender": signer.party,
        "receiver": COORDINATOR, "direction": Direction.SENT, "payload_type": PayloadType.STATUS,
        "schema_version": 1, "payload_size": 1, "payload_sha256": bytes(32),
        "verdict": Verdict(accepted=True), "levels": SecAggLevels(level1=True, level2=True),
        "attributes": NoAttributes(),
    }  # fmt: skip
    fields.update(changes)
    return AuditRecord(**fields).encode()  # type: ignore[arg-type]


def _registration(signer: Signer, counter: int, key: bytes | None = None) -> bytes:
    attrs = KeyRegistration(role=Role.BOUNDARY, signing_key=key or signer.public_key)
    return _status(
        signer,
        counter,
        payload_type=PayloadType.KEY_REGISTRATION,
        receiver=LOG_PARTY,
        attributes=attrs,
    )


def test_first_record_must_be_a_self_signed_registration() -> None:
    log, signer = memory_log(), Signer.generate("org-a")
    with pytest.raises(UnknownSigner):
        log.append(_status(signer, 1), signer.sign(_status(signer, 1)))
    other = Signer.generate("org-a")
    data = _registration(signer, 1)
    with pytest.raises(SignatureError):
        log.append(data, other.sign(data))
    assert log.append(data, signer.sign(data)).index == 0


def test_records_must_verify_under_the_registered_key() -> None:
    log, signer, thief = memory_log(), Signer.generate("org-a"), Signer.generate("org-a")
    reg = _registration(signer, 1)
    log.append(reg, signer.sign(reg))
    data = _status(signer, 2)
    with pytest.raises(SignatureError) as info:
        log.append(data, thief.sign(data))
    assert info.value.found == "an invalid signature"
    assert log.size == 1


def test_a_party_cannot_register_another_key_but_may_repeat_its_own() -> None:
    log, signer, thief = memory_log(), Signer.generate("org-a"), Signer.generate("org-a")
    reg = _registration(signer, 1)
    log.append(reg, signer.sign(reg))
    again = _registration(signer, 2)
    log.append(again, signer.sign(again))
    swap = _registration(thief, 3)
    with pytest.raises(KeyConflict) as info:
        log.append(swap, thief.sign(swap))
    assert info.value.expected == signer.public_key.hex()


def test_a_replayed_or_lower_counter_is_refused() -> None:
    log, signer = memory_log(), Signer.generate("org-a")
    reg = _registration(signer, 5)
    log.append(reg, signer.sign(reg))
    for counter in (5, 4):
        data = _status(signer, counter)
        with pytest.raises(CounterReplay):
            log.append(data, signer.sign(data))


def test_append_many_is_all_or_nothing() -> None:
    log, signer = memory_log(), Signer.generate("org-a")
    reg, ok, bad = _registration(signer, 1), _status(signer, 2), _status(signer, 2, window=9)
    with pytest.raises(CounterReplay):
        log.append_many([(reg, signer.sign(reg)), (ok, signer.sign(ok)), (bad, signer.sign(bad))])
    assert log.size == 0
    results = log.append_many([(reg, signer.sign(reg)), (ok, signer.sign(ok))])
    assert [r.index for r in results] == [0, 1] and log.tree_head().size == 2


def _gates(policy: Policy | None = None) -> tuple[EgressGate, EgressGate, LocalSink]:
    sink, clock = LocalSink(memory_log()), Clock()
    policy = policy or Policy()
    boundary = registered_gate("org-a", Role.BOUNDARY, policy, sink, clock)
    coord = registered_gate(COORDINATOR, Role.COORDINATOR, policy, sink, clock)
    return boundary, coord, sink


def _last(sink: LocalSink) -> AuditRecord:
    log = sink._log
    return AuditRecord.decode(log.entries(log.size - 1, log.size)[0].record)


def test_a_delta_from_one_device_is_refused_logged_and_never_sent() -> None:
    boundary, _, sink = _gates()
    calls: list[bytes] = []
    with pytest.raises(PolicyViolation) as info:
        boundary.send(
            PayloadType.MASKED_DELTA,
            COORDINATOR,
            3,
            b"\x01" * 64,
            DeltaAttributes(cohort_size=3, devices=1),
            lambda: calls.append(b"sent"),
        )
    assert calls == []
    record = _last(sink)
    assert info.value.index == sink._log.size - 1
    assert not record.verdict.accepted and "k_min 2" in record.verdict.reason
    assert record.attributes == DeltaAttributes(cohort_size=3, devices=1)


def test_a_delta_from_a_small_cohort_is_refused() -> None:
    boundary, _, _ = _gates()
    with pytest.raises(PolicyViolation, match="m_min"):
        boundary.send(
            PayloadType.MASKED_DELTA,
            COORDINATOR,
            3,
            b"x",
            DeltaAttributes(cohort_size=1, devices=8),
            lambda: None,
        )


@pytest.mark.parametrize(
    "statistic", ["tokens", "weight", "drift", "delta_norm", "train_loss", "val_loss", "staleness"]
)
def test_a_statistic_in_the_clear_is_refused(statistic: str) -> None:
    # Every statistic of a boundary crosses masked (docs/protocol.md); in the clear it is
    # refused, recorded as refused, and the verifier reports it.
    boundary, _, sink = _gates()
    attrs = MetadataAttributes(fields=tuple(sorted(("base_version", "devices", statistic))))
    with pytest.raises(PolicyViolation, match=statistic):
        boundary.send(PayloadType.WINDOW_METADATA, COORDINATOR, 1, b"m", attrs, lambda: None)
    assert not _last(sink).verdict.accepted
    clean = MetadataAttributes(fields=("base_version", "devices"))
    boundary.send(PayloadType.WINDOW_METADATA, COORDINATOR, 1, b"m", clean, lambda: None)
    assert _last(sink).verdict.accepted


def test_metadata_with_an_extra_field_is_refused() -> None:
    boundary, _, sink = _gates()
    attrs = MetadataAttributes(fields=("per_device_loss", "tokens"))
    with pytest.raises(PolicyViolation, match="per_device_loss"):
        boundary.send(PayloadType.WINDOW_METADATA, COORDINATOR, 1, b"m", attrs, lambda: None)
    assert not _last(sink).verdict.accepted


def test_a_plain_delta_is_refused_while_level_2_is_on_and_allowed_in_a_baseline() -> None:
    boundary, _, _ = _gates()
    attrs = DeltaAttributes(cohort_size=2, devices=2)
    with pytest.raises(PolicyViolation, match="level-2"):
        boundary.send(PayloadType.PLAIN_DELTA, COORDINATOR, 1, b"d", attrs, lambda: None)
    baseline, _, sink = _gates(Policy(level2=False))
    assert baseline.send(PayloadType.PLAIN_DELTA, COORDINATOR, 1, b"d", attrs, lambda: 7) == 7
    assert _last(sink).levels == SecAggLevels(level1=True, level2=False)


def test_types_outside_the_senders_role_and_oversized_payloads_are_refused() -> None:
    boundary, _, _ = _gates()
    with pytest.raises(PolicyViolation, match="not allowed from a boundary"):
        boundary.send(PayloadType.GLOBAL_ADAPTER, COORDINATOR, 1, b"g", None, lambda: None)
    with pytest.raises(PolicyViolation, match="exceeds"):
        boundary.send(PayloadType.STATUS, COORDINATOR, 1, b"s" * 5000, None, lambda: None)
    with pytest.raises(PolicyViolation, match="schema version"):
        boundary.send(
            PayloadType.STATUS, COORDINATOR, 1, b"s", None, lambda: None, schema_version=2
        )


def test_attributes_of_the_wrong_class_are_a_programming_error_not_a_send() -> None:
    boundary, _, sink = _gates()
    size = sink._log.size
    with pytest.raises(RecordError):
        boundary.send(PayloadType.MASKED_DELTA, COORDINATOR, 1, b"d", None, lambda: None)
    assert sink._log.size == size


def test_the_receiver_logs_what_it_got_and_refuses_what_should_not_cross() -> None:
    boundary, coord, sink = _gates()
    attrs = DeltaAttributes(cohort_size=2, devices=2)
    coord.received(PayloadType.MASKED_DELTA, "org-a", 1, b"d", attrs)
    record = _last(sink)
    assert (record.direction, record.signer, record.sender) == (
        Direction.RECEIVED,
        "coord",
        "org-a",
    )
    with pytest.raises(PolicyViolation):
        boundary.received(PayloadType.MASKED_DELTA, COORDINATOR, 1, b"d", attrs)


def test_counters_strictly_increase_under_concurrent_sends() -> None:
    boundary, _, sink = _gates()
    threads = [
        threading.Thread(target=lambda: [
            boundary.send(PayloadType.STATUS, COORDINATOR, 1, b"s", None, lambda: None)
            for _ in range(25)
        ])
        for _ in range(4)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = sink._log
    mine = [AuditRecord.decode(e.record) for e in log.entries(0, log.size)]
    counters = [r.counter for r in mine if r.signer == "org-a"]
    assert len(counters) == 101 and counters == sorted(set(counters))


def test_a_clean_exchange_verifies() -> None:
    sink = LocalSink(memory_log())
    run_exchange(sink, windows=2)
    log = sink._log
    report = verify_log(log.entries(0, log.size), [log.tree_head()], verifier=None)
    assert report.ok, report.render()
    assert report.counts[("MASKED_DELTA", "sent")] == 4
    assert report.counts[("MASKED_DELTA", "received")] == 4


def test_a_baseline_run_passes_and_is_marked_in_the_verdict() -> None:
    sink = LocalSink(memory_log())
    run_exchange(sink, windows=1, policy=Policy(level2=False))
    log = sink._log
    report = verify_log(log.entries(0, log.size), [log.tree_head()], verifier=None)
    assert report.ok, report.render()
    assert report.counts[("PLAIN_DELTA", "sent")] == 2
    assert "BASELINE run: secure aggregation level 2 off" in report.verdict()


def test_the_declared_policy_round_trips_through_the_run_declaration() -> None:
    policy = Policy(m_min=3, k_min=5, level1=False)
    config = declaration_bytes(policy)
    assert RunDeclaration.from_canonical_bytes(config).policy() == policy
    with pytest.raises(ConfigError, match="m_min"):
        Policy(m_min=1)
