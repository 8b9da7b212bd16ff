"""WAN emulation for local deployments: delaying TCP proxies between each organization and
the global plane, run on one asyncio loop in a background thread of the launcher.

This machine's kernel has no netem, so latency is injected in user space
(`echelon_tools.delay_proxy`): a boundary agent registers the proxy's address, and reaches
the coordinator through another, so every byte between the two planes is delayed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from echelon_tools.delay_proxy import DelayConfig, DelayProxy

T = TypeVar("T")


def free_port() -> int:
    """A loopback port that is free now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProxyHost:
    """Runs delay proxies on a private event loop; `stop()` closes them all."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wan", daemon=True)
        self._thread.start()
        self._proxies: list[DelayProxy] = []

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def proxy(
        self,
        target_port: int,
        one_way_s: float,
        bandwidth_mbps: float | None,
        listen_host: str = "127.0.0.1",
    ) -> int:
        """Starts a proxy to `target_port` delaying each direction by `one_way_s`, listening on
        `listen_host`; its port."""
        config = DelayConfig(
            up_delay_s=one_way_s, down_delay_s=one_way_s, bandwidth_mbps=bandwidth_mbps
        )
        proxy = DelayProxy(target_port=target_port, config=config, listen_host=listen_host)
        port = self._run(proxy.start())
        self._proxies.append(proxy)
        return port

    def stop(self) -> None:
        for proxy in self._proxies:
            self._run(proxy.stop())
        self._proxies.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
