"""Hostile device workers for tests over real worker processes: a `DeviceWorker` whose
level-1 side misbehaves at one stage, run by the pool through its `entry` hook (a spawned
process imports this module by name). Everything else is the real worker: it loads the
model and data, joins the gloo group and trains."""

from __future__ import annotations

import functools
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.device.control import StartWindow, WorkerSpec
from echelon.device.masking import DeviceMasking
from echelon.device.members import WorkerEntry, exit_worker
from echelon.device.worker import DeviceWorker, worker_main
from echelon.protocol.messages import SurvivorsAnnounced, SurvivorsSigned
from echelon.protocol.rounds import PartyRounds

Hostility = Literal["garbage", "other_window", "wrong_length", "too_long", "bad_signature"]


class HostileMasking(DeviceMasking):
    """The real level-1 party, except at the stage its `hostility` names."""

    def __init__(
        self,
        hostility: Hostility,
        *,
        conn: Connection,
        start: StartWindow,
        shard: int,
        identity: Ed25519PrivateKey,
    ) -> None:
        super().__init__(conn=conn, start=start, shard=shard, identity=identity)
        self.hostility = hostility
        self.shard = shard
        self.identity = identity

    def exchange_keys(self) -> bool:
        if self.hostility == "garbage":
            self._conn.send_bytes(b"not a pickle")
            _linger(self._conn)
        if self.hostility == "other_window":
            secure = self._secure
            elsewhere = PartyRounds(
                party=self.shard,
                window=self.window + 1,
                cohort=secure.cohort,
                config=secure.config,
                secure=True,
                identity=self.identity,
                identities={p: Ed25519PublicKey.from_public_bytes(k) for p, k in secure.identities},
                graph_seed=secure.graph_seed,
            )
            self._conn.send(elsewhere.advertise())
            _linger(self._conn)
        return super().exchange_keys()

    def mask(
        self, theta_v: np.ndarray, theta: np.ndarray, *, tokens: int, train_loss: float
    ) -> torch.Tensor:
        masked = super().mask(theta_v, theta, tokens=tokens, train_loss=train_loss)
        if self.hostility == "wrong_length":
            return masked[:-1].clone()
        if self.hostility == "too_long":  # over gloo, this aborted the agent's process
            return torch.cat([masked, masked])
        return masked

    def finish(self) -> bool:
        if self.hostility == "bad_signature":
            announced = self._expect(SurvivorsAnnounced)
            assert announced is not None
            self._conn.send(SurvivorsSigned(window=self.window, signature=bytes(64)))
            _linger(self._conn)
        return super().finish()


class HostileWorker(DeviceWorker):
    hostility: Hostility

    def masking(self, msg: StartWindow, conn: Connection) -> DeviceMasking:
        return HostileMasking(
            self.hostility, conn=conn, start=msg, shard=self.spec.shard, identity=self.identity
        )


def _linger(conn: Connection) -> None:
    """A hostile device stays connected (and silent) until the agent drops it."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        exit_worker()
    exit_worker()


def _hostile_entry(
    hostile_shard: int, hostility: Hostility, spec: WorkerSpec, conn: Connection
) -> None:
    def make(spec: WorkerSpec) -> DeviceWorker:
        if spec.shard != hostile_shard:
            return DeviceWorker(spec)
        worker = HostileWorker(spec)
        worker.hostility = hostility
        return worker

    worker_main(spec, conn, worker_type=make)
    exit_worker()


def hostile_entry(hostile_shard: int, hostility: Hostility) -> WorkerEntry:
    """The pool's `entry`: shard `hostile_shard` is hostile, the others honest."""
    return functools.partial(_hostile_entry, hostile_shard, hostility)
