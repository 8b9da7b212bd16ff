"""A party witnesses the audit log: a log rolled back to an older copy is caught by the
party's own tree-head check, and the party stops all egress (fail closed)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import grpc
import pytest

from echelon.audit.checkpoint import load_verifier
from echelon.audit.record import PayloadType
from echelon.protocol.events import Train
from services.audit_log.server import AuditLogConfig, create_server
from services.common.audited import EgressHalted
from services.common.witnessing import LogWatch

from .sessions import ORGS, Sites, federation_config, start_sites

pytestmark = pytest.mark.timeout(60)


def test_rolled_back_log_halts_the_party(tmp_path: Path) -> None:
    snapshot_taken = threading.Event()

    def gate(sites: Sites, boundary: str, command: Train) -> None:
        # the first training run waits until the test has copied the log as it is then
        assert snapshot_taken.wait(30), "the test never took its snapshot"

    sites = start_sites(federation_config(), gate=gate, audit=tmp_path)
    assert sites.audit is not None
    log_dir = tmp_path / "audit"
    peer = sites.audit.peers["org-a"]
    key = load_verifier(str(log_dir / "log.vkey"))
    state = tmp_path / "org-a" / "witness.json"
    snapshot = tmp_path / "old" / "log.db"
    address = f"127.0.0.1:{sites.audit.server.port}"
    try:
        assert sites.coordinator.wait(
            lambda: len(sites.coordinator.status().sessions) == len(ORGS), 30
        )
        snapshot.parent.mkdir()
        with sqlite3.connect(log_dir / "log.db") as src, sqlite3.connect(snapshot) as dst:
            src.backup(dst)
        for name in ("log.key", "log.vkey"):
            (snapshot.parent / name).write_bytes((log_dir / name).read_bytes())
        snapshot_taken.set()
        assert sites.run(), "the window did not finish"
        assert sites.coordinator.outcomes[0].committed
        with grpc.insecure_channel(address) as channel:
            LogWatch(peer=peer, verifier=key, state_file=state, channel=channel).check()
        assert peer.gate is not None  # consistent so far: egress continues
        peer.gate.send(PayloadType.STATUS, "coordinator", 9, b"ok", None, lambda: None)

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
