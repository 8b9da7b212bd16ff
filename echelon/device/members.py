"""Membership of a device pool: spawning worker processes (spawn context, never fork),
admitting them, supervising them (exit codes, pipe EOF), dropping dead or late ones, and
rebuilding the agent's gloo group on a fresh rendezvous port when membership changes."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

import structlog
import torch.distributed as dist

from echelon.device.control import (
    EvalResult,
    FromWorker,
    Joined,
    JoinGroup,
    Ready,
    Stop,
    ToWorker,
    WindowDone,
    WorkerError,
    WorkerSpec,
)
from echelon.device.group import LOOPBACK, GroupInfo, PointToPointGroup, connect, new_store
from echelon.device.handle import WorkerHandle, await_any
from echelon.training.adapter import AdapterLayout

log = structlog.get_logger(__name__)

_M = TypeVar(
    "_M",
    Ready,
    Joined,
    WindowDone,
    EvalResult,
)
POLL_S = 0.05
_REBUILD_ATTEMPTS = 3


class PoolError(RuntimeError):
    """The pool cannot do what was asked (not started, closed, or no worker left)."""


#: What a spawned worker process runs; it must be importable by name (spawn pickles it).
WorkerEntry = Callable[[WorkerSpec, Connection], None]


def worker_entry(spec: WorkerSpec, conn: Connection) -> None:
    """A device worker process: serves `spec` over `conn`, then exits without teardown."""
    # Runs in the spawned child: the worker module (and transformers, peft) is imported there
    # only, so the agent process stays lean.
    from echelon.device.worker import worker_main

    worker_main(spec, conn)
    exit_worker()


def exit_worker() -> None:
    """The worker persisted its state after each window and has left its group: skip the
    interpreter's teardown of torch, gloo and the model (seconds per worker), crash-only."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Membership:
    """The live workers of one pool and the gloo group the agent shares with them."""

    def __init__(
        self,
        spec_for: Callable[[int], WorkerSpec],
        *,
        n_workers: int,
        start_timeout_s: float,
        collective_timeout_s: float,
        restart: bool,
        entry: WorkerEntry = worker_entry,
    ) -> None:
        self._spec_for = spec_for
        self._entry = entry
        self._n_workers = n_workers
        self._start_timeout_s = start_timeout_s
        self._collective_timeout_s = collective_timeout_s
        self._restart = restart
        self._ctx = mp.get_context("spawn")
        self.workers: dict[int, WorkerHandle] = {}
        self.layout: AdapterLayout | None = None
        self._group: PointToPointGroup | None = None
        self._store: dist.TCPStore | None = None
        self._generation = 0
        self._dirty = True

    def start(self) -> None:
        """Spawn every shard's worker and admit those that come up.

        Raises:
            PoolError: no worker came up, or the workers disagree on the adapter layout.
        """
        handles = [self.spawn(shard) for shard in range(self._n_workers)]
        for handle in handles:
            self.admit(handle)
        if not self.workers:
            raise PoolError("no worker started; see the workers' logs")

    def close(self) -> None:
        """Stop every worker (Stop, then terminate, then kill) and drop the group."""
        for handle in self.workers.values():
            self.send(handle, Stop())
        deadline = time.monotonic() + 10.0
        for handle in list(self.workers.values()):
            handle.process.join(max(0.0, deadline - time.monotonic()))
            self.kill(handle)
        self.workers.clear()
        self.abort_group()

    def terminate_all(self) -> None:
        """SIGTERM to every worker without waiting (safe from another thread: the driving
        thread's pending receives then fail at once, peer closed); `close` reaps them."""
        for handle in list(self.workers.values()):
            if handle.process.is_alive():
                handle.process.terminate()

    def spawn(self, shard: int) -> WorkerHandle:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=self._entry,
            args=(self._spec_for(shard), child),
            name=f"echelon-worker-{shard}",
            daemon=True,
        )
        process.start()
        child.close()
        log.info("worker_spawned", shard=shard, pid=process.pid)
        return WorkerHandle(shard=shard, process=process, conn=parent)

    def admit(self, handle: WorkerHandle) -> None:
        ready = self.await_reply(handle, Ready, self._start_timeout_s)
        if ready is None:
            self.kill(handle)
            log.warning("worker_start_failed", shard=handle.shard)
            return
        layout = AdapterLayout.from_json(ready.layout_json)
        if self.layout is None:
            self.layout = layout
        elif layout.digest() != self.layout.digest():
            self.kill(handle)
            raise PoolError(
                f"worker {handle.shard} layout digest {layout.digest()}, "
                f"want {self.layout.digest()}"
            )
        handle.identity = ready.identity
        self.workers[handle.shard] = handle
        self._dirty = True

    def supervise(self) -> None:
        for shard, handle in list(self.workers.items()):
            if not handle.process.is_alive():
                self.drop(shard, f"exited with code {handle.process.exitcode}")
        if self._restart:
            for shard in range(self._n_workers):
                if shard not in self.workers:
                    self.admit(self.spawn(shard))

    def require_group(self) -> PointToPointGroup:
        """The current group, rebuilt first when membership changed.

        Raises:
            PoolError: no live worker, or the group could not be rebuilt.
        """
        for attempt in range(_REBUILD_ATTEMPTS):
            if not self.workers:
                raise PoolError("no live worker")
            if not self._dirty and self._group is not None:
                return self._group
            try:
                self._rebuild_group()
            except RuntimeError as exc:
                log.warning("pool_group_rebuild_failed", attempt=attempt, error=str(exc))
                self._dirty = True
                self.supervise()
        if self._group is None or self._dirty:
            raise PoolError(f"could not rebuild the worker group in {_REBUILD_ATTEMPTS} attempts")
        return self._group

    def _rebuild_group(self) -> None:
        self.abort_group()
        self._generation += 1
        world = len(self.workers) + 1
        self._store = new_store(world, self._collective_timeout_s)
        info = GroupInfo(
            host=LOOPBACK,
            port=self._store.port,
            generation=self._generation,
            world_size=world,
            timeout_s=self._collective_timeout_s,
        )
        for rank, shard in enumerate(sorted(self.workers), start=1):
            handle = self.workers[shard]
            handle.rank = rank
            self.send(handle, JoinGroup(group=info, rank=rank))
        group = connect(info, 0, self._store)
        for shard in sorted(self.workers):
            if self.await_reply(self.workers[shard], Joined, self._collective_timeout_s) is None:
                group.abort()
                raise RuntimeError(f"worker {shard} did not join generation {self._generation}")
        self._group = group
        self._dirty = False
        log.info("pool_group_built", generation=self._generation, workers=world - 1, port=info.port)

    def abort_group(self) -> None:
        if self._group is not None:
            self._group.abort()
        self._group = None
        self._store = None

    def send(self, handle: WorkerHandle, msg: ToWorker) -> bool:
        try:
            handle.conn.send(msg)
            return True
        except (BrokenPipeError, OSError):
            return False

    def await_reply(self, handle: WorkerHandle, kind: type[_M], timeout_s: float) -> _M | None:
        """The worker's next reply if it is a `kind`; None on error, death, EOF or timeout."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                # Woken by the reply or by the worker's exit: a worker that trains for
                # seconds costs one wake-up here, not one per POLL_S.
                await_any([handle], remaining, POLL_S)
                if handle.conn.poll(0):
                    reply: FromWorker = handle.conn.recv()
                    if isinstance(reply, kind):
                        return reply
                    message = reply.message if isinstance(reply, WorkerError) else reply
                    log.warning("worker_unexpected_reply", shard=handle.shard, reply=str(message))
                    return None
            except (EOFError, OSError):
                return None
            if not handle.process.is_alive() and not handle.conn.poll(0):
                return None
        return None

    def drop(self, shard: int, reason: str, *, window: int | None = None) -> None:
        handle = self.workers.pop(shard, None)
        if handle is None:
            return
        log.warning("worker_dropped", shard=shard, reason=reason, window=window)
        self.kill(handle)
        self._dirty = True

    @staticmethod
    def kill(handle: WorkerHandle) -> None:
        if handle.process.is_alive():
            handle.process.terminate()
            handle.process.join(5.0)
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join(5.0)
        handle.conn.close()
