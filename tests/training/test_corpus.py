"""Demo corpus: registry-free fallback, caching, cleaning (never touches the network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from echelon.training.corpus import clean_text, fetch_domain, main


def test_stdlib_domain_is_built_once(tmp_path: Path) -> None:
    first = fetch_domain("stdlib-c", tmp_path, max_bytes=20_000, allow_network=False)
    mtime = first.path.stat().st_mtime_ns
    second = fetch_domain("stdlib-c", tmp_path, max_bytes=20_000, allow_network=False)

    text = first.path.read_text(encoding="utf-8")
    assert first.domain == "stdlib-c" and first.source.startswith("stdlib:collections")
    assert 10_000 < len(text.encode()) <= 20_000
    assert second.path.stat().st_mtime_ns == mtime


def test_debian_domain_falls_back_offline(tmp_path: Path) -> None:
    got = fetch_domain("quotations", tmp_path, max_bytes=5_000, allow_network=False)

    assert got.requested == "quotations"
    assert got.domain == "stdlib-c"
    assert got.path == tmp_path / "stdlib-c.txt"


def test_domains_differ(tmp_path: Path) -> None:
    a = fetch_domain("stdlib-a", tmp_path, max_bytes=5_000, allow_network=False)
    b = fetch_domain("stdlib-b", tmp_path, max_bytes=5_000, allow_network=False)

    assert a.path.read_text() != b.path.read_text()


def test_clean_text_drops_markup_and_caps() -> None:
    lines = ["Title", "=====", "", "", "  two   spaces\there ", "x" * 50]

    assert clean_text(lines, max_bytes=1000) == "Title\n\ntwo spaces here\n" + "x" * 50 + "\n"
    assert clean_text(lines, max_bytes=10) == "Title\n"


def test_unknown_domain_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="want one of scripture"):
        fetch_domain("poetry", tmp_path)


def test_cli_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["fetch", "--cache", str(tmp_path), "--domains", "stdlib-d", "--max-mb", "0.01"]) == 0
    )

    assert "stdlib-d\tstdlib-d" in capsys.readouterr().out
