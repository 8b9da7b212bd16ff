"""The delaying TCP proxy adds its configured latency on loopback, in each direction."""

from __future__ import annotations

import asyncio
import time

import pytest

from echelon_tools.delay_proxy import DelayConfig, DelayProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trip(port: int, payload: bytes) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    elapsed = time.monotonic() - started
    assert got == payload
    writer.close()
    return elapsed


async def _measure(config: DelayConfig, payload: bytes) -> tuple[float, float]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    proxy = DelayProxy(target_port=target, config=config)
    port = await proxy.start()
    try:
        direct = await _round_trip(target, payload)
        proxied = await _round_trip(port, payload)
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()
    return direct, proxied


def test_adds_the_delay_of_both_directions() -> None:
    direct, proxied = asyncio.run(
        _measure(DelayConfig(up_delay_s=0.05, down_delay_s=0.1), b"x" * 1000)
    )

    assert proxied >= 0.15
    assert proxied - direct < 0.15 + 0.25  # loaded CI machines are slow, but not that slow


def test_bandwidth_cap_paces_large_payloads() -> None:
    _, proxied = asyncio.run(_measure(DelayConfig(bandwidth_mbps=8.0), b"y" * 200_000))

    assert proxied >= 0.2 * 0.95  # 200 kB at 1 MB/s; the echo pipelines the two directions


def test_refuses_non_loopback_targets_and_bad_config() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy(target_port=1, config=DelayConfig(), target_host="10.0.0.1")
    with pytest.raises(ValueError, match=">= 0"):
        DelayConfig(up_delay_s=-1.0)
