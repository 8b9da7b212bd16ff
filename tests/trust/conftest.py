"""Fixtures of the trust tests: real federations provisioned into temporary directories."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from echelon.declaration import ModelIdentity, RunDeclaration
from echelon.trust.kit import Kit, load_kit
from echelon.trust.manifest import SignedManifest
from echelon_tools.provision import FederationSpec, provision

MODEL = ModelIdentity(bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32, 64)
NOW = datetime.now(UTC)  # TLS handshakes check validity against the real clock


def declaration(run_id: str = "run-1") -> RunDeclaration:
    return RunDeclaration(run_id=run_id, model=MODEL)


@dataclass(frozen=True)
class Federation:
    out: Path
    signed: SignedManifest

    def kit(self, party_id: str) -> Kit:
        return load_kit(self.out / party_id, now=NOW)


def make_federation(out: Path, run_id: str = "run-1") -> Federation:
    spec = FederationSpec(
        declaration=declaration(run_id), boundaries=("org-a", "org-b"), auditors=("auditor",)
    )
    return Federation(out, provision(spec, out, now=NOW))


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    return make_federation(tmp_path / "fed")


@pytest.fixture
def other_federation(tmp_path: Path) -> Federation:
    """Another federation with the same party names, run id and layout: another root and CA."""
    return make_federation(tmp_path / "other")
