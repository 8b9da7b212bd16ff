"""Builders shared by the audit tests: a fixed log key, a clock, a small multi-party exchange."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from echelon.audit import (
    LOG_PARTY,
    AuditSink,
    DeltaAttributes,
    EgressGate,
    KeyRegistration,
    LogSigner,
    MemoryLogStore,
    MetadataAttributes,
    PayloadType,
    Policy,
    Role,
    RunConfig,
    Signer,
    TransparencyLog,
)
from echelon.declaration import ModelIdentity, RunDeclaration, SecureAggregationConfig
from echelon.window import WindowConfig

LOG_SEED = bytes(range(32))
ORIGIN = "echelon.test/audit"
COORDINATOR = "coord"


def log_signer() -> LogSigner:
    return LogSigner.from_seed(name="test-log", origin=ORIGIN, seed=LOG_SEED)


def memory_log() -> TransparencyLog:
    return TransparencyLog(store=MemoryLogStore(), signer=log_signer())


class Clock:
    """A virtual clock in unix milliseconds that advances 1 ms per reading."""

    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        self.now_ms += 1
        return self.now_ms


def registered_gate(
    party: str, role: Role, policy: Policy, sink: AuditSink, clock: Clock
) -> EgressGate:
    """A gate whose party has logged its KEY_REGISTRATION."""
    signer = Signer.generate(party)
    gate = EgressGate(party=party, role=role, signer=signer, policy=policy, sink=sink, clock=clock)
    attrs = KeyRegistration(role=role, signing_key=signer.public_key)
    gate.send(PayloadType.KEY_REGISTRATION, LOG_PARTY, 0, signer.public_key, attrs, lambda: None)
    return gate


def declaration_bytes(policy: Policy) -> bytes:
    """The canonical declaration of a run whose allow-list is `policy`."""
    return RunDeclaration(
        run_id="test",
        model=ModelIdentity(b"\xab" * 32, b"\xcd" * 32, b"\xef" * 32, 1),
        secagg=SecureAggregationConfig(
            level1=policy.level1, level2=policy.level2, k_min=policy.k_min
        ),
        window=WindowConfig(m_min=policy.m_min, min_cohort=policy.m_min),
        payloads=policy.payloads,
    ).to_canonical_bytes()


def crossing(
    sender: EgressGate,
    receiver: EgressGate,
    payload_type: PayloadType,
    window: int,
    payload: bytes,
    attrs: object = None,
) -> None:
    """One payload sent through the sender's gate and logged by the receiver (double entry)."""
    sender.send(payload_type, receiver.party, window, payload, attrs, lambda: None)  # type: ignore[arg-type]
    receiver.received(payload_type, sender.party, window, payload, attrs)  # type: ignore[arg-type]


def run_exchange(
    sink: AuditSink,
    *,
    windows: int = 2,
    policy: Policy | None = None,
    boundaries: Sequence[str] = ("org-a", "org-b"),
    clock: Clock | None = None,
    coordinator: EgressGate | None = None,
) -> dict[str, EgressGate]:
    """Registers a coordinator and boundaries, declares the run, and runs `windows` windows."""
    policy = policy or Policy()
    clock = clock or Clock()
    coord = coordinator or registered_gate(COORDINATOR, Role.COORDINATOR, policy, sink, clock)
    gates = {b: registered_gate(b, Role.BOUNDARY, policy, sink, clock) for b in boundaries}
    config = declaration_bytes(policy)
    for gate in gates.values():
        crossing(coord, gate, PayloadType.RUN_CONFIG, 0, config, RunConfig(config=config))
    delta_type = PayloadType.MASKED_DELTA if policy.level2 else PayloadType.PLAIN_DELTA
    for window in range(1, windows + 1):
        for gate in gates.values():
            crossing(coord, gate, PayloadType.WINDOW_OPEN, window, f"open {window}".encode())
        for name, gate in gates.items():
            delta = hashlib.sha256(f"{name}/{window}".encode()).digest() * 64
            attrs = DeltaAttributes(cohort_size=len(boundaries), devices=max(2, policy.k_min))
            crossing(gate, coord, delta_type, window, delta, attrs)
            meta = MetadataAttributes(fields=("base_version", "devices"))
            crossing(gate, coord, PayloadType.WINDOW_METADATA, window, b"meta" + delta[:8], meta)
        adapter = hashlib.sha256(f"global/{window}".encode()).digest() * 128
        for gate in gates.values():
            crossing(coord, gate, PayloadType.GLOBAL_ADAPTER, window, adapter)
    return {COORDINATOR: coord, **gates}
