"""Fixtures of the security tests: the unattacked run's global versions (once per session:
every attack is compared with the same honest run) and a federated run held for an attack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Run, honest_digests, start_run


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return honest_digests(tmp_path_factory.mktemp("honest"))


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    running = start_run(tmp_path / "run")
    yield running
    running.sites.close()
