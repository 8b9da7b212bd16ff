"""Level-1 protocol plumbing without worker processes: `SecureAggregation` (agent side) and
`DeviceMasking` (devices, run as threads on real Pipes) decode the sum when the round can
complete, and refuse a round that cannot before any unmasking share is released."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal, cast

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from echelon.device.contribution import WindowTotals
from echelon.device.control import StartWindow, WorkerSpec
from echelon.device.handle import WorkerHandle
from echelon.device.masking import DeviceMasking
from echelon.device.members import Membership
from echelon.device.pool import RefusalReason, WindowRefused, device_secagg_config
from echelon.device.secure import SecureAggregation

NUMEL = 64
TOKENS = 100
CONFIG = device_secagg_config(max_devices=8)
Vectors = queue.Queue[tuple[int, torch.Tensor]]


class ThreadProcess:
    """Stands in for a worker process: the device is a thread of the test process."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.exitcode = None

    def is_alive(self) -> bool:
        return self.thread.is_alive()


@dataclass
class Device:
    """One simulated device: its update, where it stops, and how its window ended."""

    shard: int
    stop: Literal["before_mask", "after_mask"] | None = None
    delta: np.ndarray = field(default_factory=lambda: np.zeros(NUMEL))
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    ended: str = "running"
    errors: list[BaseException] = field(default_factory=list)

    def run(self, conn: Connection, start: list[StartWindow], out: Vectors) -> None:
        try:
            masking = DeviceMasking(conn=conn, start=start[0], shard=self.shard, identity=self.key)
            if not masking.exchange_keys():
                self.ended = "refused before masking"
                return
            if self.stop == "before_mask":
                self.ended = "dropped before masking"
                return
            theta_v = np.zeros(NUMEL, dtype=np.float32)
            theta = (theta_v - self.delta).astype(np.float32)
            out.put((self.shard, masking.mask(theta_v, theta, tokens=TOKENS, train_loss=2.0)))
            if self.stop == "after_mask":
                self.ended = "dropped after masking"
                return
            self.ended = "released shares" if masking.finish() else "refused after masking"
        except BaseException as exc:  # asserted on by the tests
            self.errors.append(exc)


def _no_spawn(shard: int) -> WorkerSpec:
    raise AssertionError("these tests spawn no worker")


def _window(devices: list[Device], *, k_min: int = 2) -> WindowTotals | WindowRefused:
    """Drive one window as the pool does, with the devices' vectors handed over in-process."""
    members = Membership(
        _no_spawn, n_workers=len(devices), start_timeout_s=5.0, collective_timeout_s=5.0,
        restart=False,
    )  # fmt: skip
    start: list[StartWindow] = []
    out: Vectors = queue.Queue()
    handles, threads = [], []
    for device in devices:
        agent_end, device_end = Pipe(duplex=True)
        thread = threading.Thread(target=device.run, args=(device_end, start, out), daemon=True)
        identity = device.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        process = cast(BaseProcess, ThreadProcess(thread))
        handles.append(WorkerHandle(device.shard, process, agent_end, identity=identity))
        threads.append(thread)
    aggregation = SecureAggregation(
        window=3, handles=handles, numel=NUMEL, config=CONFIG, k_min=k_min, graph_seed=b"test",
        token_unit=float(TOKENS), members=members, timeout_s=5.0, record=None,
    )  # fmt: skip
    start.append(
        StartWindow(
            window=3, steps=1, inner=None, send_timeout_s=10.0, secure=aggregation.start_info()
        )
    )
    for thread in threads:
        thread.start()
    failed: dict[int, str] = {}
    outcome: WindowTotals | WindowRefused
    try:
        aggregation.open(handles, failed)
        for _ in [d for d in devices if d.stop != "before_mask"]:
            aggregation.sink.add(*out.get(timeout=10.0))
        for device, thread in zip(devices, threads, strict=True):
            if device.stop is not None:
                thread.join(10.0)  # gone, as a killed worker is
            if device.stop == "before_mask":
                failed[device.shard] = "no masked vector"
        outcome = aggregation.close([h for h in handles if h.shard not in failed], failed)
    except WindowRefused as refused:
        outcome = refused
        aggregation.abort([h for h in handles if h.shard not in failed], str(refused))
    for thread in threads:
        thread.join(10.0)
    assert [e for d in devices for e in d.errors] == []
    return outcome


def test_sum_survives_a_dropout_after_masking() -> None:
    rng = np.random.default_rng(0)
    devices = [Device(s, delta=rng.normal(scale=0.01, size=NUMEL)) for s in range(4)]
    devices[3].stop = "after_mask"

    outcome = _window(devices)

    assert isinstance(outcome, WindowTotals)
    expected = sum(TOKENS * d.delta for d in devices)
    assert outcome.devices == 4 and outcome.weight_sum == 4 * TOKENS
    assert np.abs(outcome.delta_sum - expected).max() <= outcome.error_bound
    assert outcome.train_loss == pytest.approx(2.0, abs=1e-4)
    assert [d.ended for d in devices[:3]] == ["released shares"] * 3


def test_dropouts_below_the_threshold_are_refused_before_unmasking() -> None:
    # 4 devices share each secret 3-of-4 (neighbours and itself): two dropping before masking
    # leave each survivor's seed with 2 holders.
    devices = [Device(0), Device(1), Device(2, stop="before_mask"), Device(3, stop="before_mask")]

    outcome = _window(devices)

    assert isinstance(outcome, WindowRefused)
    assert outcome.reason is RefusalReason.SECAGG_ABORTED
    assert (outcome.expected, outcome.found) == (3, 2)
    assert [d.ended for d in devices[:2]] == ["refused after masking"] * 2


def test_too_few_signers_is_refused_before_any_share_is_released() -> None:
    # 4 devices, two gone after masking: their vectors are in the sum, but only 2 of each
    # survivor's 4 holders can sign, t = 3; the two signers release nothing.
    devices = [Device(0), Device(1), Device(2, stop="after_mask"), Device(3, stop="after_mask")]

    outcome = _window(devices)

    assert isinstance(outcome, WindowRefused)
    assert outcome.reason is RefusalReason.SECAGG_ABORTED
    assert (outcome.expected, outcome.found) == (3, 2)
    assert [d.ended for d in devices[:2]] == ["refused after masking"] * 2


def test_fewer_live_devices_than_k_min_is_refused_before_the_window_starts() -> None:
    with pytest.raises(WindowRefused) as refused:
        _window([Device(0), Device(1)], k_min=3)

    assert refused.value.reason is RefusalReason.TOO_FEW_DEVICES
    assert (refused.value.expected, refused.value.found) == (3, 2)


def test_device_config_uses_the_finest_fixed_point_that_cannot_overflow() -> None:
    config = device_secagg_config(max_devices=64)

    assert (config.frac_bits, config.clip, config.max_weight) == (24, 1.0, 1.0)
    assert 64 * (config.max_coordinate_units + 1) < 2**31
    assert 64 * (2 * config.max_coordinate_units + 1) >= 2**31
