"""`make demo-netns`: the demo across an emulated WAN, every site in its own network namespace.

    python -m echelon_tools.netns [--wan-ms 50] [--loss 1] [echelon demo options]

Root only (network namespaces, veth links, iptables); without root, or without `ip netns`
and iptables, it prints why it is skipped and exits 0. Topology:

    ech-org-a  vo-org-a 10.77.1.2 ── veth ── 10.77.1.1 vg-org-a ┐
                                                                  ├ ech-global: audit log,
    ech-org-b  vo-org-b 10.77.2.2 ── veth ── 10.77.2.1 vg-org-b ┘   coordinator, WAN proxies

Each organization has a link of its own to the global plane and no route anywhere else (the
global namespace does not forward, so the organizations cannot reach each other). The
coordinator and the audit log listen on ech-global's loopback; in front of them, delaying
proxies (echelon_tools.delay_proxy, this kernel has no netem) listen on each link's global end
and add the one-way delay to every byte in each direction. Loss is iptables'
`statistic --mode random` DROP on the receiving end of each link, in both directions, so TCP
retransmits across the link as it would across a lossy WAN. Organizations only dial out: an
organization's namespace drops every new inbound connection (conntrack), and the summary
reports how many were tried.

How it runs: this process (in the host's namespace, which reaches the package registries)
fetches the corpus, creates the namespaces, and runs `echelon demo --netns` inside ech-global
with `ip netns exec`; the demo runs its global services there and starts each boundary agent
with the prefix `ip netns exec ech-org-X` (the launcher's `command_prefix`). The demo's
progress lines read each agent's status the way that organization's own operator would, on
the agent's loopback inside its namespace, through a unix socket (a file: it crosses no
network) relayed into the namespace. Whatever happens (failure, Ctrl-C, SIGTERM), this
process stops what is left in the namespaces and deletes them.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

NS_PREFIX = "ech-"  # the namespaces: ech-global, ech-org-a, ech-org-b (another prefix: tests)
SUBNET = "10.77.{}"  # 10.77.N.0/24: organization N's link, .1 the global end, .2 the org's
CLONE_NEWNET = 0x40000000
_COUNT, _LOSS, _INBOUND = "ech-count", "ech-loss", "ech-inbound"


@dataclass(frozen=True)
class Link:
    """One organization's veth link to the global namespace."""

    org: str
    netns: str
    global_if: str
    org_if: str
    global_ip: str
    org_ip: str


@dataclass(frozen=True)
class Topology:
    """The namespaces, links, one-way delay (ms) and packet loss (%, each direction)."""

    orgs: tuple[str, ...]
    delay_ms: float
    loss_pct: float
    prefix: str = NS_PREFIX

    @property
    def global_ns(self) -> str:
        return f"{self.prefix}global"

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.loss_pct < 100:
            raise ValueError(
                f"Topology: got delay_ms={self.delay_ms}, loss_pct={self.loss_pct}; "
                "want delay_ms >= 0 and 0 <= loss_pct < 100"
            )

    @property
    def links(self) -> tuple[Link, ...]:
        return tuple(
            Link(
                org=org,
                netns=f"{self.prefix}{org}",
                global_if=f"vg-{org}"[:15],
                org_if=f"vo-{org}"[:15],
                global_ip=f"{SUBNET.format(i + 1)}.1",
                org_ip=f"{SUBNET.format(i + 1)}.2",
            )
            for i, org in enumerate(self.orgs)
        )

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (*(link.netns for link in self.links), self.global_ns)

    def describe(self) -> list[str]:
        links = ", ".join(f"{link.org} {link.org_ip} <-> {link.global_ip}" for link in self.links)
        return [
            f"network namespaces: {self.global_ns} (audit log, coordinator, WAN proxies), "
            + ", ".join(link.netns for link in self.links),
            f"veth links: {links}",
            f"WAN: {self.delay_ms:g} ms one way (delaying proxies in {self.global_ns}), "
            f"{self.loss_pct:g}% random packet loss in each direction (iptables statistic)",
        ]


def _run(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    done = subprocess.run(full, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(full)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why this machine cannot run the namespaced demo, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links and iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{NS_PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    try:
        for match in (
            ["-m", "statistic", "--mode", "random", "--probability", "0.5"],
            ["-p", "tcp", "--syn", "-m", "conntrack", "--ctstate", "NEW"],
            ["-m", "comment", "--comment", _COUNT],
        ):
            rule = subprocess.run(
                ["ip", "netns", "exec", probe, "iptables", "-A", "INPUT", *match, "-j", "DROP"],
                capture_output=True,
                text=True,
            )
            if rule.returncode != 0:
                return f"iptables {' '.join(match[:2])} does not work here: {rule.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def existing_namespaces() -> set[str]:
    return {line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()}


def teardown(topology: Topology, grace_s: float = 10.0) -> list[str]:
    """Stops every process left in the topology's namespaces (only this demo's run there)
    and deletes them, which removes their veth links and rules. Idempotent; returns the
    namespaces deleted."""
    present = [ns for ns in topology.namespaces if ns in existing_namespaces()]
    pids: set[int] = set()
    for ns in present:
        pids |= {int(p) for p in _run("ip", "netns", "pids", ns, check=False).split()}
    pids.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pids.discard(pid)
        give_up = time.monotonic() + grace_s
        while pids and time.monotonic() < give_up:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            time.sleep(0.1)
        if not pids:
            break
    for ns in present:
        _run("ip", "netns", "del", ns, check=False)
    return present


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def setup(topology: Topology) -> None:
    """Creates the namespaces, links, addresses and loss rules (removing any left over by an
    interrupted run first). Raises RuntimeError naming the command that failed."""
    teardown(topology)
    for ns in topology.namespaces:
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    probability = f"{topology.loss_pct / 100:.6f}"
    for link in topology.links:
        _run("ip", "-n", topology.global_ns, "link", "add", link.global_if, "type", "veth",
             "peer", "name", link.org_if, "netns", link.netns)  # fmt: skip
        for ns, dev, ip in (
            (topology.global_ns, link.global_if, link.global_ip),
            (link.netns, link.org_if, link.org_ip),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            # Wire-sized packets (no 64 KiB GSO bursts), so that loss is per packet of a WAN.
            _run("ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1")
            _run("ip", "-n", ns, "link", "set", dev, "up")
            # Every packet that arrives over the link is counted, then dropped at random.
            _run("iptables", "-A", "INPUT", "-i", dev, "-m", "comment", "--comment", _COUNT, ns=ns)
            if topology.loss_pct > 0:
                _run("iptables", "-A", "INPUT", "-i", dev, "-m", "statistic", "--mode", "random",
                     "--probability", probability, "-m", "comment", "--comment", _LOSS,
                     "-j", "DROP", ns=ns)  # fmt: skip
        # Organizations only dial out: no connection may start from the global side.
        _run("iptables", "-A", "INPUT", "-i", link.org_if, "-p", "tcp", "--syn", "-m", "conntrack",
             "--ctstate", "NEW", "-m", "comment", "--comment", _INBOUND, "-j", "DROP",
             ns=link.netns)  # fmt: skip


def loss_report(topology: Topology) -> list[str]:
    """The packets each link carried and lost, per direction, from the iptables counters."""
    lines = ["packets across the WAN links (arrived at the receiving end / dropped as loss):"]
    inbound = 0
    for link in topology.links:
        glob = _counters_dev(topology.global_ns, link.global_if)
        org = _counters_dev(link.netns, link.org_if)
        inbound += org.get(_INBOUND, 0)
        for name, got in ((f"{link.org} -> global", glob), (f"global -> {link.org}", org)):
            arrived, lost = got.get(_COUNT, 0), got.get(_LOSS, 0)
            share = 100.0 * lost / arrived if arrived else 0.0
            lines.append(f"  {name:<20}{arrived:>10,} / {lost:>6,} ({share:.2f}%)")
    lines.append(f"inbound connection attempts into the organizations: {inbound} (all refused)")
    return lines


def _counters_dev(ns: str, dev: str) -> dict[str, int]:
    """Packets matched by this module's rules on `dev` in `ns`, by rule comment."""
    out: dict[str, int] = {}
    for line in _run("iptables", "-L", "INPUT", "-v", "-x", "-n", ns=ns).splitlines():
        fields = line.split()
        if (
            len(fields) > 5
            and dev in fields
            and (found := re.search(r"/\* (ech-[a-z]+) \*/", line))
        ):
            out[found.group(1)] = out.get(found.group(1), 0) + int(fields[0])
    return out


def current_namespace() -> str | None:
    names = _run("ip", "netns", "identify", str(os.getpid()), check=False).split()
    return names[0] if names else None


class Console:
    """An organization's local operator access to its agent: a unix socket (a file: it
    crosses no network) whose connections are relayed, from a thread that entered the
    organization's network namespace, to the agent's gRPC port on that namespace's loopback
    (read from the agent's port file when a connection arrives)."""

    def __init__(self, netns: str, path: Path, port_file: Path) -> None:
        self.netns, self.path, self.port_file = netns, path, port_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._relays: set[asyncio.Task[Any]] = set()  # held: the server's stream holds none
        self._thread = threading.Thread(target=self._serve, name=f"console-{netns}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or self._loop is None:
            raise RuntimeError(f"console into {self.netns}: {self._error or 'did not start'}")

    def _serve(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:  # this thread only
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(
                asyncio.start_unix_server(self._relay, path=str(self.path))
            )
        except Exception as exc:  # reported by start()
            self._error = repr(exc)
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target: asyncio.StreamWriter | None = None
        task = asyncio.current_task()
        if task is not None:
            self._relays.add(task)
        try:
            port = int(json.loads(self.port_file.read_text())["grpc"])
            t_reader, target = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(_pipe(reader, target), _pipe(t_reader, writer))
        except (OSError, ValueError, KeyError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, target):
                if w is not None:
                    w.close()
            if task is not None:
                self._relays.discard(task)

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(64 * 1024):
        writer.write(chunk)
        await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


class GlobalPlane:
    """The demo's side (`echelon demo --netns`, run inside ech-global): places each boundary
    agent in its namespace, its WAN proxies on its link, and reports what the WAN did."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._consoles: list[Console] = []
        self._dir: Path | None = None

    @classmethod
    def inside(
        cls, orgs: tuple[str, ...], delay_ms: float, loss_pct: float, prefix: str = NS_PREFIX
    ) -> GlobalPlane:
        """Raises SystemExit unless this process runs in the global namespace of a topology
        that is set up."""
        topology = Topology(orgs, delay_ms, loss_pct, prefix)
        here = current_namespace()
        if here != topology.global_ns:
            raise SystemExit(
                f"echelon demo --netns runs inside {topology.global_ns} (here: "
                f"{here or 'the host'}); start it with `make demo-netns` "
                "(python -m echelon_tools.netns)"
            )
        missing = set(topology.namespaces) - existing_namespaces()
        if missing:
            raise SystemExit(f"echelon demo --netns: namespaces missing: {sorted(missing)}")
        return cls(topology)

    @property
    def where(self) -> str:
        return "network namespaces, " + (
            f"WAN {self.topology.delay_ms:g} ms one way, {self.topology.loss_pct:g}% loss"
        )

    def apply(self, spec: Any) -> Any:
        """`spec` (a launcher DeploymentSpec) with each agent in its namespace, dialling the
        global plane at its link's global end, and observed through a console."""
        self._dir = Path(tempfile.mkdtemp(prefix="ech-consoles-"))  # short: unix path limit
        atexit.register(self.close)
        links = {link.org: link for link in self.topology.links}
        prefix, observe = dict(spec.command_prefix), dict(spec.observe_at)
        for site in spec.sites:
            link = links[site.boundary]
            prefix[site.boundary] = ("ip", "netns", "exec", link.netns)
            console = Console(
                link.netns,
                self._dir / f"{site.boundary}.sock",
                spec.root.resolve() / "run" / f"{site.boundary}.json",
            )
            console.start()
            self._consoles.append(console)
            observe[site.boundary] = f"unix:{console.path}"
        sites = tuple(
            dataclasses.replace(
                site,
                wan_host=links[site.boundary].global_ip,
                wan_delay_s=self.topology.delay_ms / 1000.0,
            )
            for site in spec.sites
        )
        return dataclasses.replace(spec, sites=sites, command_prefix=prefix, observe_at=observe)

    def report(self) -> list[str]:
        return [*self.topology.describe(), *loss_report(self.topology)]

    def close(self) -> None:
        for console in self._consoles:
            console.stop()
        self._consoles.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _fetch_corpus(cache: Path) -> None:
    """The corpus, fetched here in the host's namespace: the namespaces reach no registry."""
    from echelon_tools.corpus import fetch_domain
    from echelon_tools.demo import ORGS, TOKENIZER_DOMAINS

    with contextlib.redirect_stdout(io.StringIO()):
        for domain in (*(d for _, d in ORGS), *TOKENIZER_DOMAINS):
            fetch_domain(domain, cache / "corpus", max_bytes=4 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m echelon_tools.netns",
        description="make demo-netns: the demo with each site in its own network namespace. "
        "Other options go to `echelon demo` (see echelon demo --help).",
    )
    parser.add_argument("--wan-ms", type=float, default=50.0, help="one-way WAN delay")
    parser.add_argument("--loss", type=float, default=1.0, help="packet loss %%, each direction")
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--prefix", default=NS_PREFIX, help="of the namespaces' names")
    args, demo_args = parser.parse_known_args(argv)
    from echelon_tools.demo import ORGS

    topology = Topology(tuple(org for org, _ in ORGS), args.wan_ms, args.loss, args.prefix)
    reason = unavailable()
    if reason is not None:
        print(f"make demo-netns: skipped: {reason}")
        return 0
    _fetch_corpus(args.cache)
    child: subprocess.Popen[bytes] | None = None
    signals_seen = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # The demo runs in a session of its own: one SIGINT makes it stop its services and
        # return; a second signal here kills it (teardown below stops the rest).
        nonlocal signals_seen
        signals_seen += 1
        if child is not None and child.poll() is None:
            if signals_seen == 1:
                print(f"\n{signal.Signals(signum).name}: stopping the demo ...", flush=True)
                child.send_signal(signal.SIGINT)
            else:
                child.kill()
        elif signals_seen == 1:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        setup(topology)
        child = subprocess.Popen(
            ["ip", "netns", "exec", topology.global_ns, sys.executable, "-m",
             "echelon_tools.cli", "demo", "--netns", topology.prefix, "--wan-ms",
             str(args.wan_ms), "--loss", str(args.loss), "--cache", str(args.cache),
             *demo_args],
            start_new_session=True,
        )  # fmt: skip
        code = child.wait()
        if code < 0:  # killed by a signal
            code = 128 - code
        if signals_seen:
            code = 130
    except KeyboardInterrupt:
        code = 130
    except RuntimeError as exc:
        print(f"make demo-netns: {exc}")
        code = 1
    finally:
        for s in previous:  # nothing interrupts the teardown
            signal.signal(s, signal.SIG_IGN)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        removed = teardown(topology)
        print(f"network namespaces removed: {', '.join(removed) or 'none were left'}")
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
