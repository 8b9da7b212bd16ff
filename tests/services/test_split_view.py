"""The check of other parties' tree heads (`SplitViewCheck`) when the log will not answer:
a forked log could refuse every cross-fork consistency request instead of failing one, so
heads that stay unproven past the bound halt the party, while a brief outage does not."""

from __future__ import annotations

import hashlib

from echelon.audit import LogSigner
from echelon.audit.checkpoint import NoteVerifier, TreeHead
from echelon.audit.proofs import ProofChain
from services.common.witnessing import SplitViewCheck

ORIGIN = "echelon.test/split"


class Peer:
    def __init__(self) -> None:
        self.halted: str | None = None

    def halt(self, reason: str) -> None:
        self.halted = reason


class SilentLog:
    """A log that answers no consistency request (a fork hiding behind an outage)."""

    def __init__(self) -> None:
        self.asked = 0

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        self.asked += 1
        raise ConnectionError("audit log unavailable")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _check() -> tuple[SplitViewCheck, Peer, SilentLog, Clock, LogSigner]:
    signer = LogSigner.from_seed(name="audit-log", origin=ORIGIN, seed=b"\x05" * 32)
    verifier = NoteVerifier(signer.verifier_key())
    own = signer.sign(3, hashlib.sha256(b"own tree").digest())
    proofs = ProofChain(verifier, latest=TreeHead(origin=ORIGIN, size=3, root_hash=own.root_hash))
    peer, source, clock = Peer(), SilentLog(), Clock()
    check = SplitViewCheck(
        peer=peer,  # type: ignore[arg-type]
        proofs=proofs,
        verifier=verifier,
        source=source,
        unproven_s=60.0,
        clock=clock,
    )
    return check, peer, source, clock, signer


def _head(signer: LogSigner, size: int) -> bytes:
    return signer.sign(size, hashlib.sha256(f"their tree {size}".encode()).digest()).checkpoint


def test_heads_the_log_will_not_prove_halt_the_party_after_the_bound() -> None:
    check, peer, source, clock, signer = _check()
    check._check_or_wait("org-a", _head(signer, 5))
    assert peer.halted is None and source.asked == 1  # an outage, so far
    clock.now += 59.0
    check._check_or_wait("org-a", _head(signer, 6))
    assert peer.halted is None
    clock.now += 2.0
    check._check_or_wait("org-a", _head(signer, 7))
    assert peer.halted is not None and "split view not ruled out" in peer.halted
    assert "org-a's tree heads" in peer.halted


def test_a_brief_outage_does_not_halt() -> None:
    check, peer, _source, clock, signer = _check()
    check._check_or_wait("org-b", _head(signer, 5))
    clock.now += 30.0
    # A head of this party's own size and root: consistent without asking the log.
    same = signer.sign(3, hashlib.sha256(b"own tree").digest()).checkpoint
    check._check_or_wait("org-b", same)
    clock.now += 60.0
    check._check_or_wait("org-b", _head(signer, 8))
    assert peer.halted is None  # the bound restarted when a head was proven
