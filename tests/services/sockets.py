"""The operating system's socket tables (Linux /proc), per process: which TCP sockets a
process listens on and which connections it opened, for tests of who dials whom."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_LISTEN, _ESTABLISHED = "0A", "01"


@dataclass(frozen=True)
class Socket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str

    @property
    def listening(self) -> bool:
        return self.state == _LISTEN

    @property
    def established(self) -> bool:
        return self.state == _ESTABLISHED


def _address(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ".".join(str(b) for b in raw[::-1])
    else:  # IPv6: four little-endian 32-bit words
        words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
        joined = b"".join(words)
        ip = ":".join(joined[i : i + 2].hex() for i in range(0, 16, 2))
        if ip.startswith("0000:0000:0000:0000:0000:ffff:"):  # v4-mapped
            tail = joined[12:]
            ip = ".".join(str(b) for b in tail)
    return ip, int(port, 16)


def _table() -> dict[int, Socket]:
    """Every TCP socket on the machine, by inode."""
    sockets: dict[int, Socket] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(name).read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            sockets[int(cols[9])] = Socket(_address(cols[1]), _address(cols[2]), cols[3])
    return sockets


def _inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def process_sockets(pid: int) -> list[Socket]:
    """The TCP sockets process `pid` holds (not its children's)."""
    table = _table()
    return [table[i] for i in _inodes(pid) if i in table]


def is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "0000:0000:0000:0000:0000:0000:0000:0001")
