"""`make demo-netns`'s emulated WAN (echelon_tools/netns.py) on real network namespaces.

Root only, with `ip netns` and iptables' statistic match: skipped, with the reason, otherwise.
The namespaces are named with a prefix of this test's own, so that a `make demo-netns` running
beside it keeps its ech-* namespaces.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from echelon_tools.netns import (
    Console,
    Topology,
    existing_namespaces,
    loss_report,
    setup,
    teardown,
)

REASON = None
if sys.platform == "linux":
    from echelon_tools.netns import unavailable

    REASON = unavailable()
else:
    REASON = "network namespaces are Linux only"
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"make demo-netns: {REASON}")

# A listener that answers every connection with the namespace it runs in, then closes.
SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode() * 50_000); c.close()
"""
# Connects, reads to the end; prints the byte count and seconds, or the error.
DIAL = """
import socket, sys, time
t = time.monotonic()
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    got = b""
    while chunk := c.recv(65536):
        got += chunk
    print(len(got), round(time.monotonic() - t, 3))
except OSError as exc:
    print("error", type(exc).__name__)
"""


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology(("org-a", "org-b"), delay_ms=0.0, loss_pct=5.0, prefix=f"echt{os.getpid()}-")
    try:
        setup(topo)
        yield topo
    finally:
        teardown(topo)
        assert not set(topo.namespaces) & existing_namespaces()


def _in(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]


def _serve(ns: str, port: int, tag: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(_in(ns, SERVE, str(port), tag), stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def _dial(ns: str, host: str, port: int, timeout_s: float) -> str:
    done = subprocess.run(
        _in(ns, DIAL, host, str(port), str(timeout_s)), capture_output=True, text=True, timeout=60
    )
    return done.stdout.strip()


def test_links_loss_and_dial_out_only(topology: Topology) -> None:
    a, b = topology.links
    glob = topology.global_ns
    servers = [_serve(glob, 7001, "g"), _serve(a.netns, 7002, "a")]
    try:
        # An organization reaches the global plane on its link, through 5% loss each way.
        got = _dial(a.netns, a.global_ip, 7001, 10)
        assert got.split()[0] == "50000", got
        got = _dial(b.netns, b.global_ip, 7001, 10)
        assert got.split()[0] == "50000", got
        # Nothing connects into an organization: not the global plane, not another one.
        assert _dial(glob, a.org_ip, 7002, 2) == "error TimeoutError"
        assert _dial(b.netns, a.org_ip, 7002, 2).startswith("error")
    finally:
        for server in servers:
            server.kill()
            server.wait()
    report = "\n".join(loss_report(topology))
    assert "inbound connection attempts into the organizations: 0" not in report, report
    lines = [line.split() for line in report.splitlines() if "->" in line]
    assert len(lines) == 4, report
    arrived = {f"{row[0]} {row[1]} {row[2]}": int(row[3].replace(",", "")) for row in lines}
    # 50 kB down to each organization: ~35 wire-sized packets (GSO off), counted on arrival.
    assert arrived["global -> org-a"] > 30 and arrived["global -> org-b"] > 30, report
    assert arrived["org-a -> global"] > 5 and arrived["org-b -> global"] > 5, report


def test_teardown_stops_what_runs_inside(topology: Topology) -> None:
    a = topology.links[0]
    sleeper = subprocess.Popen(["ip", "netns", "exec", a.netns, "sleep", "600"])
    time.sleep(0.3)
    removed = teardown(topology, grace_s=5.0)
    assert set(removed) == set(topology.namespaces)
    assert sleeper.wait(timeout=10) is not None
    assert not set(topology.namespaces) & existing_namespaces()


def test_console_reaches_an_agent_port_on_the_namespace_loopback(
    topology: Topology, tmp_path: Path
) -> None:
    """The demo reads each agent's status through a unix socket relayed into its namespace
    (nothing dials into the organization over the network)."""
    a = topology.links[0]
    server = _serve(a.netns, 7003, "c")  # binds 0.0.0.0, so also the namespace's 127.0.0.1
    port_file = tmp_path / "org-a.json"
    port_file.write_text(json.dumps({"grpc": 7003}))
    console = Console(a.netns, tmp_path / "org-a.sock", port_file)
    try:
        console.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(console.path))
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        assert got == b"c" * 50_000
    finally:
        console.stop()
        server.kill()
        server.wait()
