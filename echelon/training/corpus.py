"""The demo corpus: one real-text domain per organization (non-IID), read from a cache
directory. A Debian-backed domain is there once `echelon_tools.corpus` fetched it (`make
corpus`); until then, and for the standard-library domains, the text is Python standard
library docstrings, built locally and cached. Nothing here touches the network.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections.abc import Iterable, Iterator
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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def check_domain(name: str, max_bytes: int) -> None:
    """Checks a request for domain `name` cut at `max_bytes`.

    Raises:
        ValueError: `name` is not one of `DOMAINS`, or `max_bytes` is not positive.
    """
    if name not in DOMAINS:
        raise ValueError(f"corpus domain: got {name!r}, want one of {', '.join(DOMAINS)}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes: got {max_bytes}, want > 0")


def domain_file(name: str, cache_dir: Path) -> Path:
    """Where domain `name`'s cleaned text is cached."""
    return Path(cache_dir) / f"{name}.txt"


def cached_domain(name: str, cache_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> DomainText:
    """The cleaned text of domain `name` as `cache_dir/<domain>.txt`. A Debian domain that has
    not been fetched into `cache_dir` falls back to its standard-library domain, which is
    built on first use (later calls read the cache).

    Raises:
        ValueError: `name` is not one of `DOMAINS`, or `max_bytes` is not positive.
    """
    check_domain(name, max_bytes)
    target = domain_file(name, cache_dir)
    if name in PACKAGE_DOMAINS:
        packages, fallback = PACKAGE_DOMAINS[name]
        if target.is_file():
            return DomainText(
                requested=name, domain=name, path=target, source=f"debian:{','.join(packages)}"
            )
        log.info("corpus_fallback", domain=name, fallback=fallback, reason="not fetched")
        result = cached_domain(fallback, cache_dir, max_bytes=max_bytes)
        return DomainText(
            requested=name, domain=result.domain, path=result.path, source=result.source
        )
    group = STDLIB_GROUPS[name]
    if not target.is_file():
        write_atomic(target, clean_text(_stdlib_docstrings(group), max_bytes))
        log.info("corpus_built", domain=name, bytes=target.stat().st_size)
    return DomainText(requested=name, domain=name, path=target, source=f"stdlib:{','.join(group)}")
