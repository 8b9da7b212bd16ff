"""The demo corpus fetcher: the Debian-backed domains, fetched from Debian packages without
installing them (`apt-get download` + `dpkg-deb -x`), cleaned, size-capped and cached where
the library's `echelon.training.corpus` reads them; a domain that cannot be fetched falls
back to its standard-library domain.

CLI: `python -m echelon_tools.corpus fetch --cache DIR [--domains a,b] [--max-mb 4]`.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from echelon.training.corpus import (
    DEFAULT_MAX_BYTES,
    PACKAGE_DOMAINS,
    DomainText,
    cached_domain,
    check_domain,
    clean_text,
    domain_file,
    write_atomic,
)

log = structlog.get_logger(__name__)

_APT_TIMEOUT_S = 180.0


class CorpusUnavailable(RuntimeError):
    """A domain's packages could not be fetched or unpacked."""


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


def fetch_domain(
    name: str, cache_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, allow_network: bool = True
) -> DomainText:
    """`cached_domain(name, ...)` after fetching a Debian domain that is not cached yet (a
    second call reads nothing from the network). A Debian domain that cannot be fetched, or
    any Debian domain when `allow_network` is False, falls back to its standard-library domain.

    Raises:
        ValueError: `name` is not one of `DOMAINS`, or `max_bytes` is not positive.
    """
    check_domain(name, max_bytes)
    target = domain_file(name, cache_dir)
    if name in PACKAGE_DOMAINS and allow_network and not target.is_file():
        try:
            write_atomic(target, _fetch_debian(name, max_bytes))
            log.info("corpus_fetched", domain=name, bytes=target.stat().st_size)
        except CorpusUnavailable as exc:
            log.warning("corpus_fetch_failed", domain=name, reason=str(exc))
    return cached_domain(name, cache_dir, max_bytes=max_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echelon_tools.corpus")
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
