"""The layout shows the design: the library (`echelon/`) holds algorithms and the protocol core
and imports no transport, service or tool; the services import no tool; only the tools draw
plots; nothing reaches into torch's private C extension; the library has no import cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("echelon", "services", "echelon_tools", "tests", "benchmarks", "tools")
# Spelled in two parts so that this file does not name what it forbids.
TORCH_PRIVATE = "torch." + "_C"


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every Python file under `package`."""
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, at any depth of its code (lazy imports count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def _offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, path in _modules(package):
        for name in sorted(_imports(module, path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden) or (
                "grpc" in forbidden and name.endswith("_pb2_grpc")
            ):
                bad.append(f"{module} imports {name}")
    return bad


def test_library_imports_no_transport_service_or_tool() -> None:
    forbidden = ("grpc", "grpc_health", "grpc_reflection", "services", "echelon_tools")

    assert _offending("echelon", forbidden) == []


def test_protocol_core_is_sans_io() -> None:
    """The window protocol's cores take the time as a parameter and return commands: no
    clock, thread, socket, process, file or device is reachable from `echelon/protocol`."""
    forbidden = (
        "time",
        "threading",
        "socket",
        "asyncio",
        "select",
        "selectors",
        "multiprocessing",
        "subprocess",
        "concurrent",
        "os",
        "pathlib",
        "sqlite3",
        "torch",
        "echelon.device",
        "echelon.sim",
    )
    assert [m for m in _offending("echelon", forbidden) if m.startswith("echelon.protocol")] == []


def test_services_import_no_tool() -> None:
    assert _offending("services", ("echelon_tools",)) == []


@pytest.mark.parametrize("package", ["echelon", "services"])
def test_only_the_tools_draw_plots(package: str) -> None:
    assert _offending(package, ("matplotlib",)) == []


def test_nothing_uses_torch_private_extension() -> None:
    users = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for _, path in _modules(package)
        if TORCH_PRIVATE in path.read_text(encoding="utf-8")
    ]

    assert users == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_library_has_no_import_cycle() -> None:
    modules = dict(_modules("echelon"))
    graph = {
        module: {name for name in _imports(module, path) if name in modules and name != module}
        for module, path in modules.items()
    }
    # A package's __init__ that re-exports its submodules is imported by them only for names
    # it re-exports; an edge from a submodule to its own package is not a cycle of the design.
    for module in graph:
        graph[module] = {name for name in graph[module] if not module.startswith(name + ".")}

    assert _cycle(graph) is None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
