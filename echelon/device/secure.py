"""Level-1 secure aggregation: the devices of a window mask their weighted updates for one
another with `echelon.secagg`, so the boundary agent (the `Aggregator`) unmasks only their sum,
and only when at least `k_min` devices contributed. `SecureAggregation` is the agent side (a
`WindowAggregation`); `masking.DeviceMasking` is the worker side (one `Participant` per window).

Key material travels over each worker's control Pipe as the library's fixed-layout bytes; the
masked uint32 vector travels over gloo point-to-point as the same bytes viewed as int32 (no
reduction is involved, so no int64 widening is needed). A worker encodes
`x = [delta (numel), train_loss / LOSS_RANGE * clip]` with weight `w = tokens / token_unit`;
the library appends `w`, so the unmasked sum holds `sum w_i clip(delta_i)`, the weighted loss
and `sum w_i`. Clipping is per coordinate of the unweighted delta, at `SecAggConfig.clip`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TypeVar

import numpy as np
import structlog
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.device.contribution import (
    ContributionRejected,
    WindowTotals,
    contribution_length,
)
from echelon.device.control import (
    AbortWindow,
    Advertised,
    RelayAdvertisements,
    RelayShares,
    ReleaseShares,
    SecureStart,
    SecureToWorker,
    SharesReleased,
    SharesSent,
    SignSurvivors,
    SurvivorsSigned,
)
from echelon.device.handle import WorkerHandle
from echelon.device.masking import LOSS_RANGE
from echelon.device.members import Membership, PoolError
from echelon.secagg import (
    AbortedRound,
    Aggregator,
    EncryptedShare,
    KeyAdvertisement,
    SecAggConfig,
    SecAggError,
    UnmaskingShares,
)
from echelon.secagg.config import MODULUS_BITS

log = structlog.get_logger(__name__)

Record = Callable[[int, str, bytes], None]
_M = TypeVar("_M", Advertised, SharesSent, SurvivorsSigned, SharesReleased)


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
    """The agent's sink for masked vectors: each goes straight into the aggregator's O(d)
    accumulator (mod 2^32); the agent keeps no worker's vector."""

    kind = "masked_vector"

    def __init__(self, aggregator: Aggregator, numel: int) -> None:
        self._aggregator = aggregator
        self._numel = numel
        self.received: set[int] = set()

    def new_buffer(self) -> torch.Tensor:
        return torch.zeros(contribution_length(self._numel), dtype=torch.int32)

    def add(self, shard: int, buffer: torch.Tensor) -> None:
        """Raises ContributionRejected: the aggregator refused the vector."""
        try:
            self._aggregator.add_masked(shard, buffer.numpy().view(np.uint32))
        except SecAggError as exc:
            raise ContributionRejected(f"masked vector of worker {shard}: {exc}") from exc
        self.received.add(shard)


class SecureAggregation:
    """Agent side of one level-1 window: relays keys and shares (which it cannot read), sums
    masked vectors, fixes the survivors, collects their signatures and unmasking shares, and
    finalizes, refusing (`WindowRefused`) below `k_min` contributors or the threshold."""

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
        self._need = max(k_min, 2)
        cohort = sorted(h.shard for h in handles)
        self._require(len(cohort), RefusalReason.TOO_FEW_DEVICES, "live workers")
        self._start = SecureStart(
            cohort=tuple(cohort),
            identities=tuple(sorted((h.shard, h.identity) for h in handles)),
            config=config,
            graph_seed=graph_seed,
            token_unit=token_unit,
        )
        self._aggregator = Aggregator(
            window=window,
            cohort=cohort,
            dim=numel + 1,
            config=config,
            graph_seed=graph_seed,
            peer_identities={
                h.shard: Ed25519PublicKey.from_public_bytes(h.identity) for h in handles
            },
        )
        self.sink = MaskedContributions(self._aggregator, numel)
        self._numel = numel
        self._config = config
        self._token_unit = token_unit
        self._members = members
        self._timeout_s = timeout_s
        self._record = record
        self._done: set[int] = set()

    def start_info(self) -> SecureStart:
        return self._start

    # ---- before training: keys and shares -------------------------------------------------
    def open(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> None:
        """Collect advertisements, relay them, collect and route encrypted shares."""
        agg = self._aggregator
        for h in handles:
            ad = self._await(h, Advertised, failed)
            if ad is None:
                continue
            self._note(h.shard, "advertisement", ad.advertisement)
            try:
                agg.add_advertisement(h.shard, KeyAdvertisement.from_bytes(ad.advertisement))
            except SecAggError as exc:
                _fail(failed, h.shard, "advertisement", exc)
        ads = agg.close_advertisements()
        self._check_graph(set(ads) - set(failed), "advertised keys")
        relay = RelayAdvertisements(
            window=self.window, advertisements=tuple(a.to_bytes() for _, a in sorted(ads.items()))
        )
        advertisers = [h for h in handles if h.shard in ads and h.shard not in failed]
        self._send(advertisers, relay, failed)
        for h in advertisers:
            sent = self._await(h, SharesSent, failed)
            if sent is None:
                continue
            for payload in sent.shares:
                self._note(h.shard, "encrypted_share", payload)
            try:
                shares = [EncryptedShare.from_bytes(b) for b in sent.shares]
                agg.add_shares(h.shard, {s.recipient: s for s in shares})
            except SecAggError as exc:
                _fail(failed, h.shard, "shares", exc)
        routed = agg.route_shares()
        self._check_graph(set(routed) - set(failed), "exchanged shares")
        for h in handles:
            if h.shard in routed and h.shard not in failed:
                shares_out = tuple(s.to_bytes() for s in routed[h.shard])
                self._send([h], RelayShares(window=self.window, shares=shares_out), failed)

    # ---- after collection: survivors, consistency check, unmasking ------------------------
    def close(self, handles: Sequence[WorkerHandle], failed: dict[int, str]) -> WindowTotals:
        """Fix the survivors, run the consistency check and unmasking, decode the sum."""
        self._require(len(self.sink.received), RefusalReason.TOO_FEW_DEVICES, "masked vectors")
        try:
            survivors = tuple(self._aggregator.fix_survivors())
        except AbortedRound as exc:
            raise self._refusal(str(exc), _as_int(exc.expected), _as_int(exc.found)) from exc
        surviving = [h for h in handles if h.shard in survivors and h.shard not in failed]
        signers = self._collect_signatures(surviving, survivors, failed)
        self._check_release({h.shard for h in signers})
        signatures = self._aggregator.survivor_signatures()
        release = ReleaseShares(
            window=self.window, survivors=survivors, signatures=tuple(sorted(signatures.items()))
        )
        self._send(signers, release, failed)
        self._done.update(h.shard for h in signers)
        for h in signers:
            released = self._await(h, SharesReleased, failed)
            if released is None:
                continue
            self._note(h.shard, "unmasking_shares", released.shares)
            try:
                unmasking = UnmaskingShares.from_bytes(released.shares)
                self._aggregator.add_unmasking_shares(h.shard, unmasking)
            except SecAggError as exc:
                _fail(failed, h.shard, "unmasking shares", exc)
        try:
            result = self._aggregator.finalize()
        except SecAggError as exc:
            raise self._refusal(str(exc), _as_int(exc.expected), _as_int(exc.found)) from exc
        unit = self._token_unit
        weight_sum = result.weight_sum * unit
        loss_sum = float(result.weighted_sum[self._numel]) * LOSS_RANGE / self._config.clip * unit
        return WindowTotals(
            delta_sum=result.weighted_sum[: self._numel] * unit,
            weight_sum=weight_sum,
            train_loss=loss_sum / weight_sum if weight_sum > 0 else float("nan"),
            devices=len(result.contributors),
            error_bound=result.quantization_bound * unit,
        )

    def _collect_signatures(
        self, surviving: list[WorkerHandle], survivors: tuple[int, ...], failed: dict[int, str]
    ) -> list[WorkerHandle]:
        """Announce the survivor list; returns the live survivors whose signature verified."""
        self._send(surviving, SignSurvivors(window=self.window, survivors=survivors), failed)
        for h in surviving:
            signed = self._await(h, SurvivorsSigned, failed)
            if signed is None:
                continue
            self._note(h.shard, "survivor_signature", signed.signature)
            try:
                self._aggregator.add_survivor_signature(h.shard, signed.signature)
            except SecAggError as exc:
                _fail(failed, h.shard, "survivor signature", exc)
        signed_by = self._aggregator.survivor_signatures()
        return [h for h in surviving if h.shard in signed_by and h.shard not in failed]

    def _check_release(self, signers: set[int]) -> None:
        """Refuse before any share is released when the signers cannot complete the round:
        each signer needs t signatures among its holders (neighbours and itself: its own
        `unmask` rule), and each secret to rebuild (seeds of survivors, keys of dropped
        parties that masked with a survivor) needs t signing holders."""
        graph = self._aggregator.graph
        short = graph.short_of(signers, signers)
        if short is not None:
            party, have, want = short
            raise self._refusal(f"party {party} sees {have} signatures, want t", want, have)
        short = graph.short_of(self._aggregator.secrets_due, signers)
        if short is not None:
            owner, have, want = short
            raise self._refusal(f"{have} signers hold shares of party {owner}", want, have)

    def abort(self, handles: Sequence[WorkerHandle], reason: str) -> None:
        """Tell every worker still inside the window's protocol that its sum is refused."""
        for h in handles:
            if h.shard not in self._done:
                self._members.send(h, AbortWindow(window=self.window, reason=reason))
                self._done.add(h.shard)

    # ---- internals ------------------------------------------------------------------------
    def _await(self, h: WorkerHandle, kind: type[_M], failed: dict[int, str]) -> _M | None:
        reply = self._members.await_reply(h, kind, self._timeout_s)
        if reply is None or reply.window != self.window:
            failed.setdefault(h.shard, f"no {kind.__name__} for window {self.window}")
            return None
        return reply

    def _send(
        self, handles: Sequence[WorkerHandle], msg: SecureToWorker, failed: dict[int, str]
    ) -> None:
        for h in handles:
            if not self._members.send(h, msg):
                failed.setdefault(h.shard, f"control pipe closed ({type(msg).__name__})")

    def _note(self, shard: int, kind: str, payload: bytes) -> None:
        if self._record is not None:
            self._record(shard, kind, payload)

    def _require(self, count: int, reason: RefusalReason, what: str) -> None:
        if count < self._need:
            raise WindowRefused(
                f"window {self.window}: {count} {what}, want >= {self._need} "
                f"(k_min and the 2-party minimum of secure aggregation); {reason.value}",
                window=self.window,
                reason=reason,
                expected=self._need,
                found=count,
            )

    def _check_graph(self, parties: set[int], stage: str) -> None:
        """Refuse before any worker reaches `AbortedRound`: each remaining party needs t
        remaining holders of its shares, itself included (the library's own rule)."""
        self._require(len(parties), RefusalReason.TOO_FEW_DEVICES, stage)
        short = self._aggregator.graph.short_of(parties, parties)
        if short is not None:
            party, have, want = short
            raise self._refusal(f"{stage}: party {party} has {have} holders left", want, have)

    def _refusal(self, detail: str, expected: int, found: int) -> WindowRefused:
        """Too few parties remain to remove every mask (the threshold t of the library)."""
        reason = RefusalReason.SECAGG_ABORTED
        return WindowRefused(
            f"window {self.window}: {reason.value}: {detail} (want {expected}, found {found})",
            window=self.window,
            reason=reason,
            expected=expected,
            found=found,
        )


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else -1


def _fail(failed: dict[int, str], shard: int, what: str, exc: SecAggError) -> None:
    failed.setdefault(shard, f"{what}: {type(exc).__name__}: {exc}")
