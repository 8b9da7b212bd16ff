"""Write the hashed install locks of one build variant (run by `make lock`).

Usage: python tools/lock.py VARIANT --torch REQ [--torch-index URL] [--out DIR]

A variant is a build of PyTorch (`cpu`: `torch==2.13.0+cpu`; `cuda`: PyPI's Linux
wheel `torch===2.13.0`, which is the CUDA build). For each variant two files are
written, both installed with `pip install --require-hashes --no-deps`:

- `requirements/torch-VARIANT.txt`: torch alone, installed first, because it may
  come from another index (PyTorch's) than the rest;
- `requirements/lock-VARIANT.txt`: every other distribution of the dev/CI install
  (pyproject.toml's runtime dependencies and all its extras), torch's own
  dependencies included.

pip resolves (`pip install --dry-run --ignore-installed --report`, through pip's
configured indexes, find-links and constraints, plus --torch-index), so the locks
are for the interpreter that runs this script (CPython 3.11, Linux x86_64). Each
pin then gets the sha256 of every file of that exact version that the indexes
list (any platform), plus the digest of the file pip picked. Sources that cannot
be reached are named in the lock's header; no hash is ever made up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import (
        InvalidSdistFilename,
        InvalidWheelFilename,
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef]
        InvalidSdistFilename,
        InvalidWheelFilename,
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def project_requirements(pyproject: Path) -> list[str]:
    """Runtime dependencies plus every extra: what the dev/CI install holds."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in sorted(project.get("optional-dependencies", {})):
        reqs += project["optional-dependencies"][extra]
    return reqs


def resolve(reqs: list[str], torch_index: str | None) -> list[dict[str, object]]:
    """pip's resolution of `reqs`, as the `install` entries of its report."""
    with tempfile.TemporaryDirectory() as tmp:
        req_file = Path(tmp) / "in.txt"
        req_file.write_text("\n".join(reqs) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--only-binary=:all:", "--report", str(report), "-r", str(req_file)]
        if torch_index:
            cmd += ["--extra-index-url", torch_index]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        install: list[dict[str, object]] = json.loads(report.read_text())["install"]
        return install


def pip_sources() -> tuple[list[str], list[str]]:
    """The index URLs and find-links locations in pip's configuration."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    indexes: list[str] = []
    links: list[str] = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        values = value.strip().strip("'\"").split()
        if key.endswith(".index-url") and not key.endswith("extra-index-url"):
            indexes[:0] = values
        elif key.endswith("extra-index-url"):
            indexes += values
        elif key.endswith("find-links"):
            links += values
    if not any(re.match(r"[\w:]*\.index-url=", line) for line in out.splitlines()):
        indexes.insert(0, PYPI)
    return list(dict.fromkeys(indexes)), list(dict.fromkeys(links))


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def _read(url: str) -> tuple[str, str]:
    """(body, content type) of a URL; a file:// directory reads its index.html."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
        if path.is_dir():
            path = path / "index.html"
        return path.read_text(), "text/html"
    request = urllib.request.Request(url, headers={"Accept": f"{SIMPLE_JSON}, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode(), response.headers.get("Content-Type", "")


def index_files(index: str, name: str) -> list[tuple[str, str]]:
    """(file name, sha256) of every file that a simple index lists for `name`."""
    body, ctype = _read(f"{index.rstrip('/')}/{canonicalize_name(name)}/")
    files: list[tuple[str, str]] = []
    if "json" in ctype:
        for entry in json.loads(body)["files"]:
            digest = entry.get("hashes", {}).get("sha256")
            if digest:
                files.append((entry["filename"], digest))
        return files
    anchors = _Anchors()
    anchors.feed(body)
    for href in anchors.hrefs:
        url, _, fragment = href.partition("#")
        match = re.fullmatch(r"sha256=([0-9a-f]{64})", fragment)
        if match:
            files.append((urllib.parse.unquote(url.rsplit("/", 1)[-1]), match.group(1)))
    return files


def link_files(location: str, name: str) -> list[tuple[str, str]]:
    """(file name, sha256) of the files of `name` in a local find-links directory."""
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if not path.is_dir():
        return []
    files = []
    for item in sorted(path.iterdir()):
        if _parse(item.name)[0] == canonicalize_name(name):
            files.append((item.name, hashlib.sha256(item.read_bytes()).hexdigest()))
    return files


def _parse(filename: str) -> tuple[str | None, Version | None]:
    try:
        if filename.endswith(".whl"):
            parsed_name, version, _, _ = parse_wheel_filename(filename)
        else:
            parsed_name, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None, None
    return str(parsed_name), version


def collect_hashes(
    name: str,
    version: str,
    picked: str | None,
    indexes: list[str],
    links: list[str],
    problems: set[str],
) -> list[str]:
    """sha256 of every file of name==version that the sources list (exact version,
    local label included)."""
    digests = {picked} if picked else set()
    wanted = Version(version)
    listings: list[tuple[str, str]] = []
    for index in indexes:
        try:
            listings += index_files(index, name)
        except FileNotFoundError:
            continue  # a local index without this project
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if not (isinstance(exc, urllib.error.HTTPError) and exc.code == 404):
                problems.add(f"{index} ({type(exc).__name__})")
    for location in links:
        listings += link_files(location, name)
    for filename, digest in listings:
        parsed_name, parsed_version = _parse(filename)
        if parsed_name == canonicalize_name(name) and parsed_version == wanted:
            digests.add(digest)
    return sorted(digests)


def render(pins: list[tuple[str, str, list[str]]], header: list[str], op: str = "==") -> str:
    """Pins as `name==version` lines (`op` `===` keeps a local label such as +cpu from
    matching), one `--hash` per file."""
    lines = [f"# {line}".rstrip() for line in header]
    for name, version, digests in pins:
        entry = [f"{name}{op}{version}"] + [f"    --hash=sha256:{d}" for d in digests]
        lines.append(" \\\n".join(entry))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", help="build variant, e.g. cpu or cuda")
    parser.add_argument("--torch", required=True, help="torch requirement of the variant")
    parser.add_argument("--torch-index", default="", help="extra index for torch (PyTorch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "requirements")
    args = parser.parse_args()

    torch_req = Requirement(args.torch)
    if canonicalize_name(torch_req.name) != "torch":
        raise SystemExit(f"--torch must name torch, got {args.torch!r}")
    reqs = [*project_requirements(ROOT / "pyproject.toml"), args.torch]
    problems: set[str] = set()
    torch_index = args.torch_index
    if torch_index:
        try:  # pip would retry an unreachable index for every project it looks up
            _read(f"{torch_index.rstrip('/')}/torch/")
        except (urllib.error.URLError, OSError) as exc:
            print(f"{torch_index} not reachable ({exc}); resolving without it", file=sys.stderr)
            problems.add(f"{torch_index} ({type(exc).__name__})")
            torch_index = ""
    install = resolve(reqs, torch_index or None)
    indexes, links = pip_sources()
    if torch_index:
        indexes.append(torch_index)
    pins: list[tuple[str, str, list[str]]] = []
    for item in install:
        meta = item["metadata"]
        assert isinstance(meta, dict)
        info = item.get("download_info") or {}
        assert isinstance(info, dict)
        picked = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        name = str(canonicalize_name(meta["name"]))
        digests = collect_hashes(name, meta["version"], picked, indexes, links, problems)
        if not digests:
            raise SystemExit(f"no sha256 found for {name}=={meta['version']}")
        pins.append((name, meta["version"], digests))
    pins.sort()
    torch_pins = [p for p in pins if p[0] == "torch"]
    rest = [p for p in pins if p[0] != "torch"]
    if len(torch_pins) != 1 or not torch_req.specifier.contains(torch_pins[0][1], prereleases=True):
        raise SystemExit(f"pip did not resolve {args.torch}: {torch_pins}")

    pip_version = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    common = [
        f"Resolved by pip {pip_version} for CPython {platform.python_version()} on "
        f"{sys.platform} {platform.machine()}; hashes of every file of each pinned version",
        "that these sources list: " + ", ".join([*indexes, *links]) + ".",
    ]
    if problems:
        common.append(
            "Not reachable when locked (their hashes are missing): "
            + ", ".join(sorted(problems))
            + "."
        )
    install_cmd = (
        f"pip install --require-hashes --no-deps -r requirements/torch-{args.variant}.txt"
        f" && pip install --require-hashes --no-deps -r requirements/lock-{args.variant}.txt"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    torch_header = [
        f"requirements/torch-{args.variant}.txt: generated by `make lock` (tools/lock.py).",
        f"Variant {args.variant}: {args.torch}"
        + (f" (index {args.torch_index})" if args.torch_index else "")
        + "; installed before the rest:",
        f"  {install_cmd}",
        *common,
    ]
    lock_header = [
        f"requirements/lock-{args.variant}.txt: generated by `make lock` (tools/lock.py).",
        "pyproject.toml's dependencies and all its extras, for the torch of "
        f"requirements/torch-{args.variant}.txt:",
        f"  {install_cmd}",
        *common,
    ]
    (args.out / f"torch-{args.variant}.txt").write_text(
        render(torch_pins, torch_header, "===" if "===" in str(torch_req.specifier) else "==")
    )
    (args.out / f"lock-{args.variant}.txt").write_text(render(rest, lock_header))
    print(
        f"wrote {args.out}/torch-{args.variant}.txt and lock-{args.variant}.txt "
        f"({len(rest) + 1} distributions)",
        file=sys.stderr,
    )
    if problems:
        print("unreachable: " + ", ".join(sorted(problems)), file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    main()
