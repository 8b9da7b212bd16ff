"""Level-1 protocol plumbing without worker processes: `SecureAggregation` (agent side) and
`DeviceMasking` (devices, run as threads on real Pipes) decode the sum when the round can
complete, and refuse a round that cannot before any unmasking share is released. Hostile
devices (bytes that do not unpickle or parse, a message for another window, a bad signature,
a vector of the wrong length, silence) are put out with a reason; the driver never raises."""

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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from echelon.device.contribution import ContributionRejected, WindowTotals
from echelon.device.control import StartWindow, WorkerSpec
from echelon.device.handle import WorkerHandle
from echelon.device.masking import DeviceMasking
from echelon.device.members import Membership
from echelon.device.pool import RefusalReason, WindowRefused, device_secagg_config
from echelon.device.secure import PipeTransport, SecureAggregation
from echelon.protocol.messages import (
    KeysAdvertised,
    SharesReleased,
    SurvivorsAnnounced,
    SurvivorsSigned,
)
from echelon.protocol.rounds import PartyRounds

NUMEL = 64
TOKENS = 100
CONFIG = device_secagg_config(max_devices=8)
Vectors = queue.Queue[tuple[int, torch.Tensor]]
Hostility = Literal[
    "garbage", "bad_advertisement", "other_window", "silent", "wrong_length", "bad_signature"
]
KEY_STAGE_HOSTILITY: tuple[Hostility, ...] = (
    "garbage", "bad_advertisement", "other_window", "silent"
)  # fmt: skip


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
    hostile: Hostility | None = None
    delta: np.ndarray = field(default_factory=lambda: np.zeros(NUMEL))
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    ended: str = "running"
    errors: list[BaseException] = field(default_factory=list)

    def run(self, conn: Connection, start: list[StartWindow], out: Vectors) -> None:
        try:
            if self.hostile in KEY_STAGE_HOSTILITY:
                self._misbehave_at_keys(conn, start[0])
                return _linger(conn)
            masking = DeviceMasking(conn=conn, start=start[0], shard=self.shard, identity=self.key)
            if not masking.exchange_keys():
                self.ended = "refused before masking"
                return
            if self.stop == "before_mask":
                self.ended = "dropped before masking"
                return
            theta_v = np.zeros(NUMEL, dtype=np.float32)
            theta = (theta_v - self.delta).astype(np.float32)
            masked = masking.mask(theta_v, theta, tokens=TOKENS, train_loss=2.0)
            if self.hostile == "wrong_length":
                out.put((self.shard, masked[:-1]))
                return _linger(conn)
            out.put((self.shard, masked))
            if self.hostile == "bad_signature":
                assert isinstance(conn.recv(), SurvivorsAnnounced)
                conn.send(SurvivorsSigned(window=3, signature=bytes(64)))
                return _linger(conn)
            if self.stop == "after_mask":
                self.ended = "dropped after masking"
                return
            self.ended = "released shares" if masking.finish() else "refused after masking"
        except BaseException as exc:  # asserted on by the tests
            self.errors.append(exc)

    def _misbehave_at_keys(self, conn: Connection, start: StartWindow) -> None:
        if self.hostile == "garbage":
            conn.send_bytes(b"not a pickle")
        elif self.hostile == "bad_advertisement":
            conn.send(KeysAdvertised(window=start.window, advertisement=b"\x01" * 40))
        elif self.hostile == "other_window":
            assert start.secure is not None
            elsewhere = PartyRounds(
                party=self.shard, window=start.window + 1, cohort=start.secure.cohort,
                config=CONFIG, secure=True, identity=self.key, graph_seed=b"test",
                identities={
                    p: Ed25519PublicKey.from_public_bytes(k) for p, k in start.secure.identities
                },
            )  # fmt: skip
            conn.send(elsewhere.advertise())


def _linger(conn: Connection) -> None:
    """A hostile device stays connected (and silent) until the agent closes its end."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        return


def _no_spawn(shard: int) -> WorkerSpec:
    raise AssertionError("these tests spawn no worker")


def _window(
    devices: list[Device], *, k_min: int = 2, timeout_s: float = 5.0
) -> tuple[WindowTotals | WindowRefused, dict[int, str]]:
    """Drive one window as the pool does, with the devices' vectors handed over in-process;
    returns how it ended and the devices put out (shard -> reason)."""
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
        token_unit=float(TOKENS), members=members, timeout_s=timeout_s, record=None,
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
        senders = [d for d in devices if d.stop != "before_mask" and d.shard not in failed]
        for _ in senders:
            shard, vector = out.get(timeout=10.0)
            try:
                aggregation.sink.add(shard, vector)
            except ContributionRejected as exc:  # as `collect_contributions` does
                failed[shard] = str(exc)
        for device, thread in zip(devices, threads, strict=True):
            if device.stop is not None:
                thread.join(10.0)  # gone, as a killed worker is
            if device.stop == "before_mask":
                failed[device.shard] = "no masked vector"
        outcome = aggregation.close([h for h in handles if h.shard not in failed], failed)
    except WindowRefused as refused:
        outcome = refused
        aggregation.abort([h for h in handles if h.shard not in failed], str(refused))
    for handle in handles:
        handle.conn.close()  # the agent drops its workers: a lingering device sees EOF
    for thread in threads:
        thread.join(10.0)
    assert [e for d in devices for e in d.errors] == []
    return outcome, failed


def _devices(n: int, seed: int) -> list[Device]:
    rng = np.random.default_rng(seed)
    return [Device(s, delta=rng.normal(scale=0.01, size=NUMEL)) for s in range(n)]


def _assert_sum_of(contributors: list[Device], outcome: object) -> WindowTotals:
    """`outcome` is the weighted sum of exactly `contributors`' updates."""
    assert isinstance(outcome, WindowTotals)
    expected = sum(TOKENS * d.delta for d in contributors)
    assert outcome.devices == len(contributors)
    assert outcome.weight_sum == len(contributors) * TOKENS
    assert np.abs(outcome.delta_sum - expected).max() <= outcome.error_bound
    return outcome


def test_sum_survives_a_dropout_after_masking() -> None:
    devices = _devices(4, seed=0)
    devices[3].stop = "after_mask"

    outcome = _assert_sum_of(devices, _window(devices)[0])

    assert outcome.train_loss == pytest.approx(2.0, abs=1e-4)
    assert [d.ended for d in devices[:3]] == ["released shares"] * 3


def test_dropouts_below_the_threshold_are_refused_before_unmasking() -> None:
    # 4 devices share each secret 3-of-4 (neighbours and itself): two dropping before masking
    # leave each survivor's seed with 2 holders.
    devices = [Device(0), Device(1), Device(2, stop="before_mask"), Device(3, stop="before_mask")]

    outcome, _ = _window(devices)

    assert isinstance(outcome, WindowRefused)
    assert outcome.reason is RefusalReason.SECAGG_ABORTED
    assert (outcome.expected, outcome.found) == (3, 2)
    assert [d.ended for d in devices[:2]] == ["refused after masking"] * 2


def test_too_few_signers_is_refused_before_any_share_is_released() -> None:
    # 4 devices, two gone after masking: their vectors are in the sum, but only 2 of each
    # survivor's 4 holders can sign, t = 3; the two signers release nothing.
    devices = [Device(0), Device(1), Device(2, stop="after_mask"), Device(3, stop="after_mask")]

    outcome, _ = _window(devices)

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


@pytest.mark.parametrize(
    ("hostility", "reason"),
    [
        ("garbage", "UnpicklingError"),
        ("bad_advertisement", "MalformedMessage: KEY_ADVERTISEMENT"),
        ("other_window", "for window 4, want 3"),
        ("silent", "no answer in stage KEYS"),
        ("wrong_length", "vector of shape (65,), want (66,)"),
    ],
)
def test_a_hostile_device_is_out_and_the_sum_is_the_honest_devices(
    hostility: Hostility, reason: str
) -> None:
    devices = _devices(5, seed=1)
    devices[2].hostile = hostility

    outcome, failed = _window(devices, timeout_s=1.0 if hostility == "silent" else 5.0)

    assert list(failed) == [2] and reason in failed[2]
    honest = [d for d in devices if d.hostile is None]
    _assert_sum_of(honest, outcome)
    assert [d.ended for d in honest] == ["released shares"] * 4


def test_a_bad_survivor_signature_puts_the_device_out_of_unmasking_only() -> None:
    # Its masked vector arrived, so it is a survivor: its vector is in the sum (its seed is
    # rebuilt from the honest signers' shares), but it signs nothing and releases nothing.
    devices = _devices(4, seed=2)
    devices[1].hostile = "bad_signature"

    outcome, failed = _window(devices)

    assert list(failed) == [1] and "InvalidSignature" in failed[1]
    _assert_sum_of(devices, outcome)
    assert [d.ended for d in devices if d.shard != 1] == ["released shares"] * 3


def test_a_hostile_device_below_k_min_refuses_the_window_before_masking() -> None:
    devices = [Device(0), Device(1, hostile="bad_advertisement"), Device(2)]

    outcome, failed = _window(devices, k_min=3)

    assert isinstance(outcome, WindowRefused)
    assert outcome.reason is RefusalReason.TOO_FEW_DEVICES
    assert (outcome.expected, outcome.found) == (3, 2)
    assert list(failed) == [1]
    assert [devices[0].ended, devices[2].ended] == ["refused before masking"] * 2


class ExitsWhileChecked:
    """A worker that sends its last message and exits just as the agent checks on it: the
    message lands in the pipe during `is_alive()`, which already answers False."""

    exitcode = 0

    def __init__(self, conn: Connection, last: object) -> None:
        self.conn, self.last = conn, last

    def is_alive(self) -> bool:
        self.conn.send(self.last)
        return False


def test_the_last_message_of_a_worker_that_exits_is_still_read() -> None:
    agent_end, device_end = Pipe(duplex=True)
    last = SharesReleased(window=3, shares=b"shares")
    process = cast(BaseProcess, ExitsWhileChecked(device_end, last))
    members = Membership(
        _no_spawn, n_workers=1, start_timeout_s=1.0, collective_timeout_s=1.0, restart=False
    )
    transport = PipeTransport([WorkerHandle(0, process, agent_end)], members, record=None)

    got = transport.receive(frozenset({0}), deadline=float("inf"))

    assert got == (0, last)
