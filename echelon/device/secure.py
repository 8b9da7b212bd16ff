"""Level-1 secure aggregation: the devices of a window mask their weighted updates for one
another with `echelon.secagg`, so the boundary agent unmasks only their sum, and only when at
least `k_min` devices contributed. Both sides run the window protocol's round runner
(`echelon.protocol.rounds`), as level 2 does: `SecureAggregation` is the agent side (a
`WindowAggregation` over an `AggregatorRounds`); `masking.DeviceMasking` is the worker side
(one `PartyRounds` per window).

The round messages (`echelon.protocol.messages`, key material as the library's fixed-layout
bytes) travel over each worker's control Pipe (`PipeTransport`); the masked uint32 vector
travels over gloo point-to-point as the same bytes viewed as int32 (no reduction is involved,
so no int64 widening is needed). A worker encodes
`x = [delta (numel), train_loss / LOSS_RANGE * clip]` with weight `w = tokens / token_unit`;
the library appends `w`, so the unmasked sum holds `sum w_i clip(delta_i)`, the weighted loss
and `sum w_i`. Clipping is per coordinate of the unweighted delta, at `SecAggConfig.clip`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from enum import Enum

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.device.contribution import (
    ContributionRejected,
    WindowTotals,
    contribution_length,
)
from echelon.device.control import SecureStart, SecureToWorker, WorkerError
from echelon.device.drive import run_rounds
from echelon.device.handle import WorkerHandle, await_any
from echelon.device.masking import LOSS_RANGE
from echelon.device.members import POLL_S, Membership, PoolError
from echelon.protocol.messages import (
    ContributionSent,
    KeysAdvertised,
    SharesReleased,
    SharesSent,
    SurvivorsSigned,
    UnmaskRequested,
    WindowAborted,
)
from echelon.protocol.rounds import AggregatorRounds, Outbound, PartyMessage
from echelon.secagg import SecAggConfig
from echelon.secagg.config import MODULUS_BITS

Record = Callable[[int, str, bytes], None]


class RefusalReason(Enum):
    TOO_FEW_DEVICES = "fewer than k_min devices"
    SECAGG_ABORTED = "secure aggregation cannot complete"


class WindowRefused(PoolError):
    """The window's sum is refused: fewer than `k_min` devices contributed, or too few
    survivors remain to remove the masks. Nothing was unmasked and nothing is applied; the
    caller treats the window as "no delta". `expected`/`found` say what was missing."""

    def __init__(
        self, message: str, *, window: int, reason: RefusalReason, expected: int, found: int
    ) -> None:
        super().__init__(message)
        self.window = window
        self.reason = reason
        self.expected = expected
        self.found = found


def device_secagg_config(
    *, max_devices: int = 64, clip: float = 1.0, max_weight: float = 1.0
) -> SecAggConfig:
    """A level-1 `SecAggConfig` with the finest fixed point that cannot overflow for
    `max_devices` devices: e.g. 24 fraction bits (6e-8) for 64 devices, clip 1, weight <= 1.

    Raises:
        ConfigError: no `frac_bits` in 0..30 fits, or a value is out of range.
    """
    units = max_weight * max(clip, 1.0)
    frac_bits = 0
    for bits in range(30, -1, -1):
        if max_devices * (math.ceil(units * 2.0**bits) + 1) < 2 ** (MODULUS_BITS - 1):
            frac_bits = bits
            break
    return SecAggConfig(
        clip=clip, frac_bits=frac_bits, max_weight=max_weight, max_participants=max_devices
    )


class MaskedContributions:
    """The agent's sink for masked vectors (received over gloo as int32 words): each goes into
    the window's `AggregatorRounds` as that worker's `ContributionSent`, straight into the
    aggregator's O(d) accumulator (mod 2^32); the agent keeps no worker's vector."""

    kind = "masked_vector"

    def __init__(self, rounds: AggregatorRounds, numel: int) -> None:
        self._rounds = rounds
        self._numel = numel

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros(contribution_length(self._numel), dtype=torch.int32)

    def add(self, shard: int, buffer: torch.Tensor) -> None:
        """Raises ContributionRejected: the round refused the vector (the worker is out)."""
        rounds = self._rounds
        vector = buffer.numpy().view(np.uint32)
        rounds.receive(
            shard, ContributionSent(window=rounds.window, base_version=0, devices=1, vector=vector)
        )
        if shard not in rounds.collected:
            raise ContributionRejected(
                f"masked vector of worker {shard}: {rounds.failed.get(shard)}"
            )


class PipeTransport:
    """`RoundTransport` over the workers' control Pipes (the masked vectors travel over gloo,
    into `MaskedContributions`). Whatever a worker sends that is not a round message, a pipe
    that breaks and a worker that exits are that worker's failure; everything received is
    handed to `record` (the transcript hook) first."""

    def __init__(
        self, handles: Sequence[WorkerHandle], members: Membership, record: Record | None
    ) -> None:
        self._handles = {h.shard: h for h in handles}
        self._members = members
        self._record = record
        self.released: set[int] = set()  # sent UnmaskRequested: they end the window themselves

    def send(self, party: int, message: SecureToWorker) -> bool:
        handle = self._handles.get(party)
        if handle is None or not self._members.send(handle, message):
            return False
        if isinstance(message, UnmaskRequested):
            self.released.add(party)
        return True

    def receive(
        self, waiting: frozenset[int], deadline: float
    ) -> tuple[int, PartyMessage | str] | None:
        handles = [self._handles[p] for p in sorted(waiting) if p in self._handles]
        while True:
            for h in handles:
                # Liveness first: a worker that was gone before the poll has nothing more on
                # its pipe, while one that sends its last message and exits between the two
                # checks is still read.
                alive = h.process.is_alive()
                try:
                    if h.conn.poll(0):
                        return h.shard, self._accept(h.shard, h.conn.recv())
                except Exception as exc:  # EOF, a broken pipe, bytes that do not unpickle
                    return h.shard, f"control pipe: {type(exc).__name__}: {exc}"
                if not alive:
                    return h.shard, f"exited with code {h.process.exitcode}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await_any(handles, remaining, POLL_S)

    def _accept(self, shard: int, message: object) -> PartyMessage | str:
        if isinstance(message, WorkerError):
            return f"worker error: {message.message}"
        if not isinstance(message, PartyMessage):
            return f"sent a {type(message).__name__}, not a round message"
        if self._record is not None:
            for kind, payload in _key_material(message):
                self._record(shard, kind, payload)
        return message


def _key_material(message: PartyMessage) -> list[tuple[str, bytes]]:
    """The transcript entries of a round message received over a Pipe."""
    if isinstance(message, KeysAdvertised):
        return [("advertisement", message.advertisement)]
    if isinstance(message, SharesSent):
        return [("encrypted_share", share) for share in message.shares]
    if isinstance(message, SurvivorsSigned):
        return [("survivor_signature", message.signature)]
    if isinstance(message, SharesReleased):
        return [("unmasking_shares", message.shares)]
    return [("masked_vector", message.vector.tobytes())]


class SecureAggregation:
    """Agent side of one level-1 window: an `AggregatorRounds` over the workers (k_min as its
    `min_parties`) fed what arrives on their Pipes (`PipeTransport`) and over gloo (`sink`).
    It relays keys and shares (which it cannot read), sums masked vectors, fixes the
    survivors, collects their signatures and unmasking shares, and finalizes, refusing
    (`WindowRefused`) below `k_min` devices or the threshold, before any share is released."""

    def __init__(
        self,
        *,
        window: int,
        handles: Sequence[WorkerHandle],
        numel: int,
        config: SecAggConfig,
        k_min: int,
        graph_seed: bytes,
        token_unit: float,
        members: Membership,
        timeout_s: float,
        record: Record | None,
    ) -> None:
        self.window = window
        need = max(k_min, 2)
        cohort = sorted(h.shard for h in handles)
        if len(cohort) < need:
            raise WindowRefused(
                f"window {window}: {len(cohort)} live workers, want >= {need} (k_min and the "
                f"2-party minimum of secure aggregation); {RefusalReason.TOO_FEW_DEVICES.value}",
                window=window,
                reason=RefusalReason.TOO_FEW_DEVICES,
                expected=need,
                found=len(cohort),
            )
        self._start = SecureStart(
            cohort=tuple(cohort),
            identities=tuple(sorted((h.shard, h.identity) for h in handles)),
            config=config,
            graph_seed=graph_seed,
            token_unit=token_unit,
        )
        self._rounds = AggregatorRounds(
            window=window,
            cohort=cohort,
            length=numel + 1,
            config=config,
            graph_seed=graph_seed,
            identities={h.shard: Ed25519PublicKey.from_public_bytes(h.identity) for h in handles},
            min_parties=need,
        )
        self._transport = PipeTransport(handles, members, record)
        self._members = members
        self.sink = MaskedContributions(self._rounds, numel)
        self._numel = numel
        self._config = config
        self._token_unit = token_unit
        self._timeout_s = timeout_s

    def start_info(self) -> SecureStart:
        return self._start

    def open(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> None:
        """Key rounds: collect and relay advertisements, collect and route encrypted shares.

        Raises:
            WindowRefused: too few workers remain for the sum (`failed` says why each left).
        """
        self._run(self._tell(failed), failed)

    def close(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> WindowTotals:
        """Fix the survivors, run the consistency check and unmasking, decode the sum.

        Raises:
            WindowRefused: fewer than k_min vectors, or too few survivors to unmask.
        """
        self._run([*self._tell(failed), *self._rounds.close_collection()], failed)
        result = self._rounds.result
        assert result is not None
        unit = self._token_unit
        weight_sum = result.weight_sum * unit
        loss = float(result.weighted_sum[self._numel]) * LOSS_RANGE / self._config.clip * unit
        return WindowTotals(
            delta_sum=result.weighted_sum[: self._numel] * unit,
            weight_sum=weight_sum,
            train_loss=loss / weight_sum if weight_sum > 0 else float("nan"),
            devices=len(result.contributors),
            error_bound=self._rounds.error_bound * unit,
        )

    def abort(self, handles: Sequence[WorkerHandle], reason: str) -> None:
        """Tell every worker still inside the window's protocol that its sum is refused."""
        for h in handles:
            if h.shard not in self._transport.released:
                self._members.send(h, WindowAborted(window=self.window, reason=reason))
                self._transport.released.add(h.shard)

    def _tell(self, failed: dict[int, str]) -> list[Outbound]:
        """The round learns of the workers the pool lost (pipe, gloo, deadline)."""
        return [o for shard, why in failed.items() for o in self._rounds.fail(shard, why)]

    def _run(self, outbound: list[Outbound], failed: dict[int, str]) -> None:
        rounds = self._rounds
        run_rounds(rounds, self._transport, outbound, stage_timeout_s=self._timeout_s)
        for shard, why in rounds.failed.items():
            failed.setdefault(shard, why)
        if rounds.aborted is not None:
            aborted = rounds.aborted
            reason = (
                RefusalReason.TOO_FEW_DEVICES
                if aborted.below_minimum
                else RefusalReason.SECAGG_ABORTED
            )
            raise WindowRefused(
                f"window {self.window}: {reason.value}: {aborted.reason} (want "
                f"{aborted.expected}, found {aborted.found})",
                window=self.window,
                reason=reason,
                expected=aborted.expected,
                found=aborted.found,
            )
