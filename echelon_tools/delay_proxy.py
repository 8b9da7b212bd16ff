"""A delaying TCP proxy for real-latency checks: listens on loopback, forwards every connection
to one target, and delivers each direction's bytes no earlier than `delay_s` after they were
read, at most `bandwidth_mbps` fast. Pure asyncio, bounded buffers. It targets loopback only
and listens on loopback unless told another address (`listen_host`: the global plane's end of
a namespace's link, echelon_tools.netns).

    proxy = DelayProxy(target_port=50051, config=DelayConfig(up_delay_s=0.2, down_delay_s=0.2))
    port = await proxy.start()      # clients connect to 127.0.0.1:port
    ...
    await proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
_READ_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class DelayConfig:
    """Per-direction one-way delay (up: client to target) and an optional bandwidth cap."""

    up_delay_s: float = 0.0
    down_delay_s: float = 0.0
    bandwidth_mbps: float | None = None
    max_buffered_bytes: int = 8 * 1024 * 1024
    max_connections: int = 64

    def __post_init__(self) -> None:
        if self.up_delay_s < 0 or self.down_delay_s < 0:
            raise ValueError(
                f"DelayConfig: got up_delay_s={self.up_delay_s}, down_delay_s="
                f"{self.down_delay_s}; want >= 0"
            )
        if self.bandwidth_mbps is not None and not self.bandwidth_mbps > 0:
            raise ValueError(f"DelayConfig.bandwidth_mbps: got {self.bandwidth_mbps}, want > 0")
        if self.max_buffered_bytes < _READ_BYTES or self.max_connections < 1:
            raise ValueError(
                f"DelayConfig: want max_buffered_bytes >= {_READ_BYTES} and max_connections >= 1"
            )


class _Pipe:
    """One direction: a reader task stamps chunks, a writer task releases them when due."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay_s: float,
        config: DelayConfig,
    ) -> None:
        self.reader, self.writer, self.delay_s, self.config = reader, writer, delay_s, config
        # Bounded by bytes: each queued chunk is at most _READ_BYTES.
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(
            maxsize=max(1, config.max_buffered_bytes // _READ_BYTES)
        )

    async def pump_in(self) -> None:
        try:
            while chunk := await self.reader.read(_READ_BYTES):
                await self.queue.put((time.monotonic() + self.delay_s, chunk))
        finally:
            await self.queue.put((0.0, b""))

    async def pump_out(self) -> None:
        rate = self.config.bandwidth_mbps
        free_at = 0.0  # when the simulated link is next idle
        while True:
            due, chunk = await self.queue.get()
            if not chunk:
                break
            now = time.monotonic()
            if rate is not None:
                start = max(due, free_at, now)
                free_at = start + len(chunk) * 8.0 / (rate * 1e6)
                due = free_at
            if due > now:
                await asyncio.sleep(due - now)
            self.writer.write(chunk)
            await self.writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()


class DelayProxy:
    """Forwards `listen_host`:<port> to `target_host:target_port` with injected delay."""

    def __init__(
        self,
        *,
        target_port: int,
        config: DelayConfig,
        target_host: str = LOOPBACK,
        listen_host: str = LOOPBACK,
    ) -> None:
        if target_host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError(f"DelayProxy.target_host: got {target_host!r}, want loopback only")
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.config = config
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DelayProxy: not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        """Listens on an ephemeral port of `listen_host`; returns it."""
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        return self.port

    async def stop(self) -> None:
        """Stops listening and cuts every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= self.config.max_connections or task is None:
            c_writer.close()
            return
        self._tasks.add(task)
        self.connections += 1
        t_writer: asyncio.StreamWriter | None = None
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
            up = _Pipe(c_reader, t_writer, self.config.up_delay_s, self.config)
            down = _Pipe(t_reader, c_writer, self.config.down_delay_s, self.config)
            await asyncio.gather(up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cuts connections; a connection handler ends quietly rather than report
            # a cancelled task to the stream server's done-callback.
            pass
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)
