"""The demo corpus: one real-text domain per organization (non-IID), fetched from Debian
packages without installing them (`apt-get download` + `dpkg-deb -x`), cleaned, size-capped
and cached; falls back to Python standard library docstrings when no registry is reachable.

CLI: `python -m echelon.training.corpus fetch --cache DIR [--domains a,b] [--max-mb 4]`.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# Disjoint groups of standard-library packages: four distinct, registry-free domains.
STDLIB_GROUPS: dict[str, tuple[str, ...]] = {
    "stdlib-a": ("email", "http", "urllib", "json", "xml", "html", "mailbox", "smtplib"),
    "stdlib-b": ("asyncio", "concurrent", "multiprocessing", "threading", "subprocess", "queue"),
    "stdlib-c": ("collections", "itertools", "functools", "statistics", "decimal", "fractions"),
    "stdlib-d": ("unittest", "logging", "argparse", "pathlib", "shutil", "tarfile", "zipfile"),
}
# Debian-backed domain -> (packages to download, stdlib domain used when they are unreachable).
PACKAGE_DOMAINS: dict[str, tuple[tuple[str, ...], str]] = {
    "scripture": (("bible-kjv-text", "bible-kjv"), "stdlib-a"),
    "python-docs": (("python3.11-doc",), "stdlib-b"),
    "quotations": (("fortunes",), "stdlib-c"),
    "dictionary": (("dict-gcide",), "stdlib-d"),
}
DOMAINS: tuple[str, ...] = tuple(PACKAGE_DOMAINS) + tuple(STDLIB_GROUPS)
DEFAULT_MAX_BYTES = 4 << 20
_APT_TIMEOUT_S = 180.0


class CorpusUnavailable(RuntimeError):
    """A domain's packages could not be fetched or unpacked."""


@dataclass(frozen=True, kw_only=True)
class DomainText:
    """A cached domain: `requested` is what was asked for, `domain` what the file holds."""

    requested: str
    domain: str
    path: Path
    source: str  # "debian:<packages>" or "stdlib:<packages>"


_WS = re.compile(r"[ \t]+")


def clean_text(lines: Iterable[str], max_bytes: int) -> str:
    """Normalise whitespace, drop markup-only lines, keep paragraphs; cut at `max_bytes`
    (UTF-8) on a line boundary."""
    out: list[str] = []
    size = 0
    blank = True
    for raw in lines:
        line = _WS.sub(" ", raw.replace("\x00", "")).strip()
        if line and set(line) <= set("=-~^*#+`'._:|<>"):
            continue
        if not line:
            if blank:
                continue
            blank = True
        else:
            blank = False
        encoded = len(line.encode("utf-8")) + 1
        if size + encoded > max_bytes:
            break
        out.append(line)
        size += encoded
    return "\n".join(out).strip() + "\n"


def _stdlib_docstrings(packages: Iterable[str]) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for pkg in packages:
        base = root / pkg
        files = sorted(base.rglob("*.py")) if base.is_dir() else [root / f"{pkg}.py"]
        for path in files:
            if "test" in path.parts[len(root.parts) :] or not path.is_file():
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        yield from doc.splitlines()
                        yield ""


def _scripture(root: Path) -> Iterator[str]:
    binary = root / "usr" / "bin" / "bible"
    data = root / "usr" / "lib" / "bible.data"
    proc = subprocess.run(
        # The binary resolves a relative data-file name only (cwd, then /usr/lib).
        [str(binary), "-f", "-d", data.name, "gen1:1-rev22:21"],
        cwd=data.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=True,
    )
    verse_ref = re.compile(r"^\S+\d+:\d+\s+")
    for line in proc.stdout.decode("utf-8", errors="replace").splitlines():
        yield verse_ref.sub("", line)


def _python_docs(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*.rst.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.lstrip().startswith(".."):
                yield line.replace("``", "")
        yield ""


def _quotations(root: Path) -> Iterator[str]:
    directory = root / "usr" / "share" / "games" / "fortunes"
    for path in sorted(directory.iterdir()):
        if path.suffix in {".dat", ".u8"} or path.is_symlink() or not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            yield "" if line.strip() == "%" else line


def _dictionary(root: Path) -> Iterator[str]:
    dz = root / "usr" / "share" / "dictd" / "gcide.dict.dz"
    with gzip.open(dz, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            yield re.sub(r"<[^>]+>|\[[^\]]*\]", "", line.rstrip("\n"))


_EXTRACTORS: dict[str, Callable[[Path], Iterator[str]]] = {
    "scripture": _scripture,
    "python-docs": _python_docs,
    "quotations": _quotations,
    "dictionary": _dictionary,
}
_apt_updated = False


def _apt_download(packages: tuple[str, ...], into: Path) -> None:
    global _apt_updated
    cmd = ["apt-get", "download", *packages]

    def attempt() -> bool:
        try:
            res = subprocess.run(cmd, cwd=into, capture_output=True, timeout=_APT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("apt_download_failed", packages=packages, error=str(exc))
            return False
        if res.returncode != 0:
            log.warning("apt_download_failed", packages=packages, stderr=res.stderr[-300:])
        return res.returncode == 0

    if attempt():
        return
    if not _apt_updated and hasattr(os, "geteuid") and os.geteuid() == 0:
        _apt_updated = True
        log.info("apt_update", reason="download failed")
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=_APT_TIMEOUT_S)
        if attempt():
            return
    raise CorpusUnavailable(f"apt-get download {' '.join(packages)} failed")


def _fetch_debian(domain: str, max_bytes: int) -> str:
    packages, _ = PACKAGE_DOMAINS[domain]
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable("apt-get/dpkg-deb not found")
    with tempfile.TemporaryDirectory(prefix=f"echelon-{domain}-") as tmp:
        work = Path(tmp)
        _apt_download(packages, work)
        root = work / "root"
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
        try:
            return clean_text(_EXTRACTORS[domain](root), max_bytes)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CorpusUnavailable(f"{domain}: could not extract text: {exc}") from exc


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def fetch_domain(
    name: str, cache_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, allow_network: bool = True
) -> DomainText:
    """The cleaned text of domain `name` as `cache_dir/<domain>.txt` (cached: a second call
    reads nothing from the network). A Debian domain that cannot be fetched, or any Debian
    domain when `allow_network` is False, falls back to its standard-library domain.

    Raises:
        ValueError: `name` is not one of `DOMAINS`.
    """
    if name not in DOMAINS:
        raise ValueError(f"corpus domain: got {name!r}, want one of {', '.join(DOMAINS)}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes: got {max_bytes}, want > 0")
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{name}.txt"
    if name in PACKAGE_DOMAINS:
        packages, fallback = PACKAGE_DOMAINS[name]
        if target.is_file():
            return DomainText(
                requested=name, domain=name, path=target, source=f"debian:{','.join(packages)}"
            )
        if allow_network:
            try:
                _write_atomic(target, _fetch_debian(name, max_bytes))
                log.info("corpus_fetched", domain=name, bytes=target.stat().st_size)
                return DomainText(
                    requested=name, domain=name, path=target, source=f"debian:{','.join(packages)}"
                )
            except CorpusUnavailable as exc:
                log.warning("corpus_fallback", domain=name, fallback=fallback, reason=str(exc))
        else:
            log.info("corpus_fallback", domain=name, fallback=fallback, reason="network disabled")
        result = fetch_domain(fallback, cache_dir, max_bytes=max_bytes, allow_network=False)
        return DomainText(
            requested=name, domain=result.domain, path=result.path, source=result.source
        )
    group = STDLIB_GROUPS[name]
    if not target.is_file():
        _write_atomic(target, clean_text(_stdlib_docstrings(group), max_bytes))
        log.info("corpus_built", domain=name, bytes=target.stat().st_size)
    return DomainText(requested=name, domain=name, path=target, source=f"stdlib:{','.join(group)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echelon.training.corpus")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch and cache the demo corpus domains")
    fetch.add_argument("--cache", type=Path, required=True)
    fetch.add_argument("--domains", default=",".join(PACKAGE_DOMAINS))
    fetch.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / (1 << 20))
    fetch.add_argument("--offline", action="store_true", help="use the stdlib fallback only")
    args = parser.parse_args(argv)
    max_bytes = int(args.max_mb * (1 << 20))
    for name in [d.strip() for d in args.domains.split(",") if d.strip()]:
        text = fetch_domain(name, args.cache, max_bytes=max_bytes, allow_network=not args.offline)
        print(f"{text.requested}\t{text.domain}\t{text.path}\t{text.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
