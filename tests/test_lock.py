"""The hashed locks in requirements/ (written by `make lock`) are complete, satisfy
pyproject.toml, and are exactly what the running virtual environment holds."""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
VARIANTS = sorted(p.stem.removeprefix("lock-") for p in REQUIREMENTS.glob("lock-*.txt"))
# Installed but not locked: the project itself (editable install of this checkout)
# and pip, which `python -m venv` bootstraps (ensurepip) and the install runs with.
# setuptools is locked: torch requires it and the editable install builds with it.
NOT_LOCKED = {"echelon", "pip"}
# Written by `make venv` next to the interpreter: the variant the venv was built from.
VARIANT_FILE = Path(sys.prefix) / "echelon-variant"


@dataclass(frozen=True)
class Pin:
    line: str
    name: str
    version: str
    hashes: tuple[str, ...]


def read_lock(path: Path) -> list[Pin]:
    """The requirement lines of a lock file, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        req = Requirement(tokens[0])
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator in ("==", "==="), (
            f"{path.name}: {tokens[0]!r} is not pinned to one version (== or ===)"
        )
        hashes = tuple(t.removeprefix("--hash=") for t in tokens[1:] if t.startswith("--hash="))
        pins.append(Pin(line, canonicalize_name(req.name), specs[0].version, hashes))
    return pins


def variant_pins(variant: str) -> dict[str, Pin]:
    pins = read_lock(REQUIREMENTS / f"torch-{variant}.txt")
    pins += read_lock(REQUIREMENTS / f"lock-{variant}.txt")
    by_name: dict[str, Pin] = {}
    for pin in pins:
        assert pin.name not in by_name, f"{pin.name} is pinned twice in the {variant} locks"
        by_name[pin.name] = pin
    return by_name


def test_there_are_locks() -> None:
    assert "cpu" in VARIANTS, f"no requirements/lock-cpu.txt (found {VARIANTS}): run `make lock`"
    for variant in VARIANTS:
        assert (REQUIREMENTS / f"torch-{variant}.txt").is_file(), (
            f"requirements/lock-{variant}.txt has no torch-{variant}.txt: run "
            f"`make lock VARIANT={variant}`"
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pin_has_a_sha256(variant: str) -> None:
    for pin in variant_pins(variant).values():
        assert pin.hashes, f"{variant}: {pin.name}=={pin.version} has no --hash"
        bad = [h for h in pin.hashes if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)]
        assert not bad, f"{variant}: {pin.name}=={pin.version} has malformed hashes {bad}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_lock_satisfies_pyproject(variant: str) -> None:
    """Every requirement of pyproject.toml (runtime and every extra) holds for the pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [(r, "") for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        wanted += [(r, extra) for r in reqs]
    pins = variant_pins(variant)
    problems = []
    for text, extra in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{text} (extra {extra or '-'}): not in the {variant} lock")
        elif not req.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{text} (extra {extra or '-'}): the lock pins {pin.version}")
    assert not problems, (
        f"requirements/*-{variant}.txt do not satisfy pyproject.toml; run "
        f"`make lock VARIANT={variant}`:\n  " + "\n  ".join(problems)
    )


def test_installed_set_equals_lock() -> None:
    """The running venv holds exactly the locked distributions, at their versions."""
    if not VARIANT_FILE.is_file():
        pytest.skip(f"{sys.prefix} was not built by `make venv` (no {VARIANT_FILE.name})")
    variant = VARIANT_FILE.read_text().strip()
    assert variant in VARIANTS, f"{VARIANT_FILE} names {variant!r}, locks exist for {VARIANTS}"
    locked = {name: pin.version for name, pin in variant_pins(variant).items()}
    installed: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in NOT_LOCKED:
            installed[name] = dist.version
    missing = sorted(f"{n}=={v}" for n, v in locked.items() if n not in installed)
    extra = sorted(f"{n}=={v}" for n, v in installed.items() if n not in locked)
    differ = sorted(
        f"{n}: installed {installed[n]}, locked {v}"
        for n, v in locked.items()
        if n in installed and Version(installed[n]) != Version(v)
    )
    assert not (missing or extra or differ), (
        f"{sys.prefix} differs from the {variant} locks (rebuild it: make venv "
        f"VARIANT={variant}):\n  missing: {missing}\n  not locked: {extra}\n  "
        f"other version: {differ}"
    )
