"""Stages the build context of Echelon's image: the runtime part of a variant's hashed
locks, its wheels (from a wheelhouse filled by wheelhouse.sh) and the project's own
wheel, so that `docker build` needs no network and copies nothing else.

    python deploy/docker/context.py --variant cpu --wheelhouse .cache/wheelhouse-cpu \
        --out .cache/docker/context-cpu

Writes OUT/requirements.txt (the lock entries, with their hashes, of pyproject.toml's
runtime dependencies and everything they need), OUT/wheels/ (their wheels: hard links
into the wheelhouse where possible), OUT/project/ and OUT/project.txt (the project's
wheel and its sha256) and OUT/healthcheck.py.
Run from the repository root with the project's virtual environment (it builds the
project's wheel with the locked setuptools and reads metadata with `packaging`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?===?(\S+)")


class ContextError(RuntimeError):
    """The wheelhouse or the locks do not hold what the image needs."""


def lock_entries(path: Path) -> dict[str, tuple[Version, str]]:
    """A lock file's entries by canonical name: the pinned version and the entry's text,
    continuation lines and hashes included, as the lock has it."""
    entries: dict[str, tuple[Version, str]] = {}
    current: list[str] = []
    version = Version("0")
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            match = _ENTRY.match(line)
            if match is None:
                raise ContextError(f"{path}: cannot read the entry {line!r}")
            name, version = canonicalize_name(match.group(1)), Version(match.group(2))
            current = [line]
        else:
            current.append(line)
        entries[name] = (version, "\n".join(current))
    return entries


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(name).decode())
    return [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]


def runtime_closure(roots: list[Requirement], wheels: dict[str, Path]) -> set[str]:
    """Canonical names of `roots` and of everything their wheels require on this platform
    (markers evaluated for CPython 3.11 on Linux, without extras)."""
    environment = {k: str(v) for k, v in default_environment().items()}
    environment.update(python_version="3.11", python_full_version="3.11.2")
    environment.update(sys_platform="linux", platform_system="Linux", os_name="posix")
    environment.update(platform_machine="x86_64", implementation_name="cpython")
    environment.update(platform_python_implementation="CPython")
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        env = {**environment, "extra": ""}
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        if name not in wheels:
            raise ContextError(
                f"{requirement}: no wheel of {name} at a locked version in the wheelhouse "
                "(not in the locks, or the wheelhouse was filled from other locks)"
            )
        todo.extend(wheel_requirements(wheels[name]))
    return seen


def project_wheel(out: Path) -> Path:
    """Builds the project's wheel into `out` with the environment's setuptools, leaving
    no build/ or egg-info behind that was not there before."""
    out.mkdir(parents=True, exist_ok=True)
    leftovers = [p for p in (Path("build"), Path("echelon.egg-info")) if not p.exists()]
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet"]
    command += ["--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), "."]
    # Fixed zip timestamps: the same code gives the same wheel, byte for byte, so that the
    # image's project layer stays cached until the code changes.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    try:
        subprocess.run(command, check=True, env=env)
    finally:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    built = sorted(out.glob("echelon-*.whl"))
    if len(built) != 1:
        raise ContextError(f"want one echelon wheel in {out}, found {built}")
    return built[0]


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage(variant: str, wheelhouse: Path, out: Path) -> tuple[int, int]:
    """Writes the context; returns (wheels, bytes). Raises ContextError."""
    locks = [Path(f"requirements/torch-{variant}.txt"), Path(f"requirements/lock-{variant}.txt")]
    entries: dict[str, tuple[Version, str]] = {}
    for lock in locks:
        if not lock.is_file():
            raise ContextError(f"no lock for variant {variant}: {lock}")
        entries.update(lock_entries(lock))
    # The wheelhouse may hold other versions too (an older lock's): take the locked ones.
    wheels: dict[str, Path] = {}
    for wheel in wheelhouse.glob("*.whl"):
        found, version, _, _ = parse_wheel_filename(wheel.name)
        if found in entries and entries[found][0] == version:
            wheels[found] = wheel
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    own = project_wheel(out / "project")
    names = runtime_closure(wheel_requirements(own), wheels)
    for name in sorted(names):
        _link(wheels[name], out / "wheels" / wheels[name].name)
    header = [
        f"# The runtime part of requirements/{{torch,lock}}-{variant}.txt, written by",
        "# deploy/docker/context.py: what the image installs, with the locks' hashes.",
    ]
    lines = [*header, *(entries[name][1] for name in sorted(names))]
    (out / "requirements.txt").write_text("\n".join(lines) + "\n")
    # The project's own wheel, hash-checked too, in a layer of its own: a change to the
    # code rebuilds only that layer.
    digest = hashlib.sha256(own.read_bytes()).hexdigest()
    _, version, _, _ = parse_wheel_filename(own.name)
    (out / "project.txt").write_text(f"echelon=={version} --hash=sha256:{digest}\n")
    shutil.copy2(HERE / "healthcheck.py", out / "healthcheck.py")
    size = sum(p.stat().st_size for p in (*(out / "wheels").iterdir(), own))
    return len(names) + 1, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cpu")
    parser.add_argument("--wheelhouse", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        count, size = stage(args.variant, args.wheelhouse, args.out)
    except ContextError as exc:
        print(f"context: {exc}", file=sys.stderr)
        return 1
    print(f"context: {args.out} ({count} wheels, {size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
