"""A party witnesses the audit log: a log rolled back to an older copy is caught by the
party's own tree-head check, and the party stops all egress (fail closed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from echelon.audit.checkpoint import load_verifier
from echelon.audit.record import PayloadType
from services.audit_log.server import AuditLogConfig, create_server
from services.common.audited import EgressHalted
from services.common.witnessing import LogWatch

from .harness import Sites


def test_rolled_back_log_halts_the_party(tmp_path: Path) -> None:
    sites = Sites(tmp_path, ["org-a", "org-b", "org-c"])
    peer = sites.agents["org-a"].audit
    key = load_verifier(str(tmp_path / "audit" / "log.vkey"))
    state = tmp_path / "org-a" / "witness.json"
    snapshot = tmp_path / "old" / "log.db"
    try:
        snapshot.parent.mkdir()
        with (
            sqlite3.connect(tmp_path / "audit" / "log.db") as src,
            sqlite3.connect(snapshot) as dst,
        ):
            src.backup(dst)
        for name in ("log.key", "log.vkey"):
            (snapshot.parent / name).write_bytes((tmp_path / "audit" / name).read_bytes())
        sites.heartbeat_all()
        assert sites.driver.step().committed  # type: ignore[union-attr]
        with grpc.insecure_channel(sites.audit_address) as channel:
            LogWatch(peer=peer, verifier=key, state_file=state, channel=channel).check()
        assert peer.gate is not None  # consistent so far: egress continues

        # The operator serves the older copy of the log: the party's next check catches it.
        old = create_server(AuditLogConfig(data_dir=snapshot.parent, origin="echelon.test/sites"))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{old.port}") as channel:
                LogWatch(peer=peer, verifier=key, state_file=state, channel=channel).check()
        finally:
            old.stop(0)
        with pytest.raises(EgressHalted, match="consistency check"):
            peer.dropped(9, 1)
        with pytest.raises(EgressHalted):
            peer.gate.send(PayloadType.STATUS, "coordinator", 9, b"x", None, lambda: None)
    finally:
        sites.close()
