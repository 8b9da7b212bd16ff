"""Regenerate the `echelon_proto` package from `proto/` (run by `make proto`).

protoc names Python modules after proto paths (`echelon.boundary.v1`), which would
collide with the `echelon` library package, so the generated tree is written under
`echelon_proto/` and its imports are rewritten from `echelon.<area>.v1` to
`echelon_proto.<area>.v1`. Usage: python tools/gen_proto.py [--out DIR].
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "echelon_proto"
_IMPORT = re.compile(r"\b(from|import) echelon\.(\w+)\.v1\b")


def generate(out_dir: Path) -> None:
    """Writes the generated package into `out_dir/echelon_proto`, replacing it."""
    from grpc_tools import protoc

    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        target = out_dir / PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / "echelon", target)
    for path in sorted(target.rglob("*")):
        if path.is_dir():
            (path / "__init__.py").touch()
        elif path.suffix in (".py", ".pyi"):
            text = _IMPORT.sub(rf"\1 {PACKAGE}.\2.v1", path.read_text())
            path.write_text(text)
    (target / "__init__.py").write_text(
        '"""Generated protobuf and gRPC code for Echelon; do not edit (make proto)."""\n'
    )
    (target / "py.typed").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="directory to write into")
    args = parser.parse_args()
    generate(args.out)
    print(f"generated {PACKAGE} in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
