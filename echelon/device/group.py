"""The gloo group between a boundary agent (rank 0) and its worker processes, built from
public `torch.distributed` APIs: a `TCPStore` rendezvous on a free loopback port (bound to
loopback only), a
`PrefixStore` per membership generation, and a `ProcessGroupGloo` with a timeout of seconds
(gloo's default is 30 minutes), so that a dead peer becomes an error quickly. Tensors travel
point-to-point, so a dead or slow worker cannot wedge the others; the pool rebuilds the group,
on a fresh store port, whenever membership changes.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, cast

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class GroupInfo:
    """Where and how to join the gloo group of one membership generation."""

    host: str
    port: int
    generation: int
    world_size: int
    timeout_s: float


def new_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Agent side: a rendezvous store on a free ephemeral port of loopback only.

    torch's store would listen on every interface; it is handed a socket bound to
    127.0.0.1 instead, so nothing outside the machine can reach a boundary's device plane.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    return dist.TCPStore(
        LOOPBACK,
        port,
        world_size,
        True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here on
        use_libuv=False,
    )


def client_store(info: GroupInfo) -> dist.TCPStore:
    """Worker side: a client of the agent's rendezvous store."""
    return dist.TCPStore(
        info.host, info.port, info.world_size, False, timeout=timedelta(seconds=info.timeout_s)
    )


class PointToPointGroup(Protocol):
    """The part of a gloo process group that the pool uses (torch's stubs omit these methods
    on `ProcessGroupGloo`, which has them at run time)."""

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> dist.Work: ...

    def abort(self) -> None: ...


def connect(info: GroupInfo, rank: int, store: dist.Store) -> PointToPointGroup:
    """Join the gloo group of `info` as `rank` (blocks until all members joined or timeout).

    The gloo timeout is `info.timeout_s`, not gloo's 30 minute default, so a dead peer becomes
    an error within seconds. The caller keeps `store` alive as long as the group.
    """
    prefixed = dist.PrefixStore(f"echelon/pool/{info.generation}", store)
    group = dist.ProcessGroupGloo(
        prefixed, rank, info.world_size, timedelta(seconds=info.timeout_s)
    )
    return cast(PointToPointGroup, group)
