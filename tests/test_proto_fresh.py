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


def test_no_message_can_carry_device_state() -> None:
    """Every bytes field of the boundary service names an aggregate-level payload."""
    from echelon_proto.boundary.v1 import boundary_pb2

    allowed = {
        "nonce",
        "identity_key",
        "graph_seed",
        "encoded",
        "signature",
        "sha256",
        "layout_digest",
        "data",
    }
    seen = set()
    for message in boundary_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            if field.type == field.TYPE_BYTES:
                seen.add(field.name)
    assert seen <= allowed, f"unexpected bytes fields {seen - allowed}"
