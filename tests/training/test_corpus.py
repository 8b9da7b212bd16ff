"""Demo corpus: registry-free fallback, caching, cleaning; the fetcher offline (never touches
the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echelon.training.corpus import cached_domain, clean_text
from echelon_tools.corpus import fetch_domain, main


def test_stdlib_domain_is_built_once(tmp_path: Path) -> None:
    first = cached_domain("stdlib-c", tmp_path, max_bytes=20_000)
    mtime = first.path.stat().st_mtime_ns
    second = cached_domain("stdlib-c", tmp_path, max_bytes=20_000)

    text = first.path.read_text(encoding="utf-8")
    assert first.domain == "stdlib-c" and first.source.startswith("stdlib:collections")
    assert 10_000 < len(text.encode()) <= 20_000
    assert second.path.stat().st_mtime_ns == mtime


def test_unfetched_debian_domain_falls_back(tmp_path: Path) -> None:
    got = cached_domain("quotations", tmp_path, max_bytes=5_000)

    assert got.requested == "quotations"
    assert got.domain == "stdlib-c"
    assert got.path == tmp_path / "stdlib-c.txt"


def test_fetched_debian_domain_is_read_from_the_cache(tmp_path: Path) -> None:
    (tmp_path / "quotations.txt").write_text("a fetched fortune\n", encoding="utf-8")

    got = cached_domain("quotations", tmp_path)

    assert got.domain == "quotations" and got.source == "debian:fortunes"


def test_fetcher_falls_back_offline(tmp_path: Path) -> None:
    got = fetch_domain("quotations", tmp_path, max_bytes=5_000, allow_network=False)

    assert got.requested == "quotations"
    assert got.domain == "stdlib-c"
    assert got.path == tmp_path / "stdlib-c.txt"


def test_domains_differ(tmp_path: Path) -> None:
    a = cached_domain("stdlib-a", tmp_path, max_bytes=5_000)
    b = cached_domain("stdlib-b", tmp_path, max_bytes=5_000)

    assert a.path.read_text() != b.path.read_text()


def test_clean_text_drops_markup_and_caps() -> None:
    lines = ["Title", "=====", "", "", "  two   spaces\there ", "x" * 50]

    assert clean_text(lines, max_bytes=1000) == "Title\n\ntwo spaces here\n" + "x" * 50 + "\n"
    assert clean_text(lines, max_bytes=10) == "Title\n"


def test_unknown_domain_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="want one of scripture"):
        cached_domain("poetry", tmp_path)
    with pytest.raises(ValueError, match="want one of scripture"):
        fetch_domain("poetry", tmp_path)


def test_cli_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["fetch", "--cache", str(tmp_path), "--domains", "stdlib-d", "--max-mb", "0.01"]) == 0
    )

    assert "stdlib-d\tstdlib-d" in capsys.readouterr().out
