"""The coordinator's side of a window's aggregation: level-2 secure aggregation rounds
over real agents, or the plain sum of the no-secure-aggregation baseline.

Both present one interface to the window driver: key rounds, add a contribution,
fix the survivors, unmask. Parties are indexes in the window's sorted cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Protocol, TypeVar

import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.aggregation import AggregationError, PlainAggregator, WindowSum
from echelon.secagg import AbortedRound, Aggregator, SecAggConfig, SecAggError, UnmaskingShares
from echelon_proto.boundary.v1 import boundary_pb2
from services.common.secagg_wire import (
    ad_from_proto,
    ad_to_proto,
    config_from_params,
    share_from_proto,
    share_to_proto,
)

from .agents import AgentCallError, AgentClient
from .store import Registration

log = structlog.get_logger(__name__)
R = TypeVar("R")


class RoundAborted(Exception):
    """Too few parties survived a round to reconstruct or to reach m_min."""


class WindowAggregation(Protocol):
    def key_rounds(self, clients: dict[str, AgentClient], pool: futures.Executor) -> list[str]: ...
    def add(self, boundary: str, vector: np.ndarray) -> None: ...
    def fix_survivors(self) -> list[int]: ...
    def unmask(self, clients: dict[str, AgentClient], pool: futures.Executor) -> WindowSum: ...


def _each(
    pool: futures.Executor,
    clients: Mapping[str, AgentClient],
    call: Callable[[str, AgentClient], R],
) -> dict[str, R]:
    """Calls every client in parallel; returns the results of those that answered."""
    jobs = {pool.submit(call, b, c): b for b, c in clients.items()}
    results: dict[str, R] = {}
    for job in futures.as_completed(jobs):
        try:
            results[jobs[job]] = job.result()
        except (AgentCallError, SecAggError, AggregationError) as exc:
            log.warning("round_call_failed", boundary=jobs[job], error=str(exc))
    return results


class PlainWindow:
    """Level 2 off: float contributions summed in the clear (a baseline, marked so)."""

    def __init__(self, parties: dict[str, int], dim: int) -> None:
        self.parties = parties
        self._agg = PlainAggregator(cohort=sorted(parties.values()), dim=dim)

    def key_rounds(self, clients: dict[str, AgentClient], pool: futures.Executor) -> list[str]:
        return sorted(clients)

    def add(self, boundary: str, vector: np.ndarray) -> None:
        if vector.dtype != np.float32:
            raise AggregationError(f"{boundary}: got a {vector.dtype} vector, want float32 (plain)")
        self._agg.add(self.parties[boundary], vector)

    def fix_survivors(self) -> list[int]:
        return self._agg.fix_survivors()

    def unmask(self, clients: dict[str, AgentClient], pool: futures.Executor) -> WindowSum:
        return self._agg.finalize()


class SecureWindow:
    """Level 2 on: drives the Bonawitz rounds against the agents; sees only the sum."""

    def __init__(
        self,
        window: int,
        parties: dict[str, int],
        identities: dict[int, Ed25519PublicKey],
        config: SecAggConfig,
        graph_seed: bytes,
        dim: int,
    ) -> None:
        self.window = window
        self.parties = parties
        self._agg = Aggregator(
            window=window,
            cohort=sorted(parties.values()),
            dim=dim,
            config=config,
            graph_seed=graph_seed,
            peer_identities=identities,
        )
        self._survivors: list[int] = []

    def key_rounds(self, clients: dict[str, AgentClient], pool: futures.Executor) -> list[str]:
        w = self.window
        ads = _each(pool, clients, lambda b, c: c.advertise_keys(w))
        for boundary, ad in ads.items():
            self._agg.add_advertisement(self.parties[boundary], ad_from_proto(ad, w))
        relayed = [ad_to_proto(a) for _, a in sorted(self._agg.close_advertisements().items())]
        advertised = {b: clients[b] for b in ads}
        shares = _each(pool, advertised, lambda b, c: c.share_keys(w, relayed))
        for boundary, sent in shares.items():
            parsed = {s.recipient: share_from_proto(s, w) for s in sent}
            self._agg.add_shares(self.parties[boundary], parsed)
        routed = self._agg.route_shares()
        sharers = {b: clients[b] for b in shares}
        delivered = _each(
            pool,
            sharers,
            lambda b, c: c.deliver_shares(
                w, [share_to_proto(s) for s in routed.get(self.parties[b], [])]
            ),
        )
        return sorted(delivered)

    def add(self, boundary: str, vector: np.ndarray) -> None:
        if vector.dtype != np.uint32:
            raise AggregationError(f"{boundary}: got a {vector.dtype} vector, want uint32 (masked)")
        try:
            self._agg.add_masked(self.parties[boundary], vector)
        except SecAggError as exc:
            raise AggregationError(f"{boundary}: {exc}") from exc

    def fix_survivors(self) -> list[int]:
        """Ends collection; raises RoundAborted when too few survivors hold shares."""
        try:
            self._survivors = self._agg.fix_survivors()
        except AbortedRound as exc:
            raise RoundAborted(str(exc)) from exc
        return list(self._survivors)

    def unmask(self, clients: dict[str, AgentClient], pool: futures.Executor) -> WindowSum:
        w = self.window
        survivors = list(self._survivors)
        by_party = {p: b for b, p in self.parties.items()}
        alive = {by_party[p]: clients[by_party[p]] for p in survivors if by_party[p] in clients}
        signatures = _each(pool, alive, lambda b, c: c.confirm_survivors(w, survivors))
        for boundary, sig in signatures.items():
            self._agg.add_survivor_signature(self.parties[boundary], sig.signature)
        signed = list(signatures.values())
        releases = _each(
            pool, {b: alive[b] for b in signatures}, lambda b, c: c.unmask(w, survivors, signed)
        )
        for boundary, response in releases.items():
            shares = UnmaskingShares.from_bytes(response.encoded)
            self._agg.add_unmasking_shares(self.parties[boundary], shares)
        try:
            result = self._agg.finalize()
        except AbortedRound as exc:
            raise RoundAborted(str(exc)) from exc
        return WindowSum(
            weighted_sum=result.weighted_sum,
            weight_sum=result.weight_sum,
            contributors=tuple(result.contributors),
        )


def make_aggregation(
    params: boundary_pb2.SecAggParams,
    window: int,
    parties: dict[str, int],
    regs: dict[str, Registration],
    dim: int,
) -> WindowAggregation:
    """The window's aggregation, from the same declared parameters the agents receive."""
    if not params.levels.level2:
        return PlainWindow(parties, dim)
    identities = {
        parties[b]: Ed25519PublicKey.from_public_bytes(regs[b].identity_key) for b in parties
    }
    config = config_from_params(params)
    return SecureWindow(window, parties, identities, config, bytes(params.graph_seed), dim)
