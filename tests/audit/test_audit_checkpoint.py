"""C2SP checkpoints: the signed-note layout, and refusal of tampered or foreign notes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from audit_helpers import ORIGIN, Clock, log_signer, memory_log, registered_gate

from echelon.audit import (
    CheckpointError,
    LocalSink,
    LogSigner,
    NoteVerifier,
    PayloadType,
    Policy,
    Role,
    RollbackError,
    Witness,
)
from echelon.audit.merkle import EMPTY_ROOT


def test_checkpoint_layout_follows_c2sp() -> None:
    signer = log_signer()
    note = signer.sign(3, bytes(32)).checkpoint.decode()
    body, _, signature = note.partition("\n\n")
    assert body == f"{ORIGIN}\n3\n{base64.b64encode(bytes(32)).decode()}"
    assert signature.startswith("\u2014 test-log ") and signature.endswith("\n")
    blob = base64.b64decode(signature.split(" ")[2])
    assert len(blob) == 4 + 64
    assert signer.verifier_key().startswith(f"test-log+{blob[:4].hex()}+")


def test_a_checkpoint_verifies_and_parses() -> None:
    signer = log_signer()
    head = NoteVerifier(signer.verifier_key(), origin=ORIGIN).verify(
        signer.sign(0, EMPTY_ROOT).checkpoint
    )
    assert (head.origin, head.size, head.root_hash) == (ORIGIN, 0, EMPTY_ROOT)


TAMPERED = {
    "size changed": lambda n: n.replace(b"\n3\n", b"\n4\n", 1),
    "root changed": lambda n: n.replace(b"AAAA", b"AAAB", 1),
    "origin changed": lambda n: n.replace(ORIGIN.encode(), b"other/log", 1),
    "signature dropped": lambda n: n.split(b"\n\n")[0] + b"\n\n",
    "no blank line": lambda n: n.replace(b"\n\n", b"\n", 1),
    "leading zero size": lambda n: n.replace(b"\n3\n", b"\n03\n", 1),
    "not utf-8": lambda n: n + b"\xff",
    "signature byte flipped": lambda n: n[:-10] + bytes([n[-10] ^ 1]) + n[-9:],
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_checkpoints_are_refused(case: str) -> None:
    signer = log_signer()
    note = TAMPERED[case](signer.sign(3, bytes(32)).checkpoint)
    with pytest.raises(CheckpointError):
        NoteVerifier(signer.verifier_key(), origin=ORIGIN).verify(note)


def test_a_checkpoint_of_another_key_is_refused() -> None:
    other = LogSigner.from_seed(name="test-log", origin=ORIGIN, seed=b"\x09" * 32)
    with pytest.raises(CheckpointError) as info:
        NoteVerifier(log_signer().verifier_key()).verify(other.sign(1, bytes(32)).checkpoint)
    assert info.value.found == "none"


def test_witness_persists_and_accepts_extensions(tmp_path: Path) -> None:
    log = memory_log()
    verifier = NoteVerifier(log.signer.verifier_key())
    witness = Witness(path=tmp_path / "w.json", verifier=verifier, source=log)
    sink, clock = LocalSink(log), Clock()
    gate = registered_gate("org-a", Role.BOUNDARY, Policy(), sink, clock)
    witness.update(log.tree_head().checkpoint)
    for _ in range(6):
        gate.send(PayloadType.STATUS, "coord", 1, b"s", None, lambda: None)
        assert witness.update(log.tree_head().checkpoint).size == log.size
    with pytest.raises(RollbackError):
        witness.update(log.signer.sign(3, log._tree.root(3)).checkpoint)
    reloaded = Witness(path=tmp_path / "w.json", verifier=verifier, source=log)
    assert reloaded.latest == witness.latest and reloaded.checkpoint == witness.checkpoint
