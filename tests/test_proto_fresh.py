"""The committed generated code in `echelon_proto/` matches what `make proto` writes."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = _tree(tmp_path / "echelon_proto")
    committed = _tree(ROOT / "echelon_proto")
    assert sorted(fresh) == sorted(committed), "files differ: run `make proto`"
    stale = [name for name, path in fresh.items() if not filecmp.cmp(path, committed[name], False)]
    assert stale == [], f"stale generated files {stale}: run `make proto` and commit"


def _bytes_fields(root: object) -> dict[str, str]:
    """Every bytes field reachable from message descriptor `root`, as name -> owner."""
    seen: dict[str, str] = {}
    todo, visited = [root], set()
    while todo:
        message = todo.pop()
        if message.full_name in visited:  # type: ignore[attr-defined]
            continue
        visited.add(message.full_name)  # type: ignore[attr-defined]
        for field in message.fields:  # type: ignore[attr-defined]
            if field.type == field.TYPE_BYTES:
                seen[field.name] = message.full_name  # type: ignore[attr-defined]
            elif field.type == field.TYPE_MESSAGE:
                todo.append(field.message_type)
    return seen


def test_no_agent_frame_can_carry_device_state() -> None:
    """Everything an agent can send (its window session's frames) is aggregate-level: each
    bytes field names a key-agreement payload, a digest, or a chunk of the one vector an
    agent sends, its masked boundary contribution (ContributionHeader + VectorChunk)."""
    from echelon_proto.coordinator.v1 import session_pb2

    allowed = {
        "nonce": "FrameContext: a fresh nonce",
        "cohort_digest": "FrameContext: a digest",
        "witness_head": "FrameContext: a signed tree head",
        "identity_key": "Hello: a public key",
        "layout_digest": "Hello / VectorHeader: a digest",
        "base_model_digest": "Hello: a digest",
        "tokenizer_digest": "Hello: a digest",
        "proof_of_possession": "Hello: a signature",
        "advertisement": "KeysAdvertised: public keys",
        "shares": "SharesSent / SharesReleased: encrypted or unmasking shares",
        "signature": "SurvivorsSigned: a signature",
        "sha256": "VectorHeader: a digest",
        "data": "VectorChunk: a chunk of the masked contribution",
    }
    seen = _bytes_fields(session_pb2.AgentFrame.DESCRIPTOR)
    assert set(seen) <= set(allowed), f"unexpected bytes fields {set(seen) - set(allowed)}"
    bodies = {f.name for f in session_pb2.AgentFrame.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert bodies == {
        "hello", "joined", "keys_advertised", "shares_sent", "contribution", "chunk",
        "survivors_signed", "shares_released", "declined",
    }  # fmt: skip


def test_the_agents_own_service_carries_no_payload() -> None:
    """The agent's local status service has no bytes field at all."""
    from echelon_proto.boundary.v1 import boundary_pb2

    for message in boundary_pb2.DESCRIPTOR.message_types_by_name.values():
        assert _bytes_fields(message.fields[0].containing_type).keys() <= {"nonce"}
