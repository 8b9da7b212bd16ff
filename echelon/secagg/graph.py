"""Neighbour graph of a window: who masks with whom and who holds whose secret shares.

A party masks with its neighbours, and its secrets are shared among its
neighbours and itself (``holders``), with a strict-majority threshold.

For small cohorts this is the complete graph (Bonawitz et al. 2017). For large
ones it is a random Harary graph as in SecAgg+ (Bell et al. 2020): the cohort is
ordered by a keyed hash of (public seed, window, party id) and each party is
joined to the ``k/2`` parties on either side of it on that ring. Every party and
the aggregator derive the same graph from public inputs, so no one has to be
trusted to announce it, and it changes every window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from echelon.secagg.config import MAX_PARTY_ID, SecAggConfig
from echelon.secagg.errors import ConfigError, UnknownParty
from echelon.secagg.messages import session_context

_GRAPH_DOMAIN = b"echelon/secagg/v1/neighbour-graph"


def graph_degree(cohort_size: int, config: SecAggConfig) -> int:
    """Number of neighbours of each party for a cohort of ``cohort_size`` parties.

    The complete graph (``cohort_size - 1``) when ``config.neighbours`` is at
    least that, or when it is ``None`` and the cohort has at most
    ``config.complete_graph_max`` parties; otherwise an even degree (a Harary
    graph needs one), ``config.neighbours`` rounded up, or ``2 * ceil(2 * log2(n))``.
    """
    complete = cohort_size - 1
    if config.neighbours is None:
        if cohort_size <= config.complete_graph_max:
            return complete
        wanted = 2 * math.ceil(2 * math.log2(cohort_size))
    else:
        wanted = config.neighbours + config.neighbours % 2
    return min(wanted, complete)


def validate_cohort(cohort: Sequence[int], config: SecAggConfig) -> tuple[int, ...]:
    """Return the cohort as a sorted tuple, or raise ``ConfigError`` saying what is wrong."""
    ordered = tuple(sorted(cohort))
    if len(set(ordered)) != len(ordered):
        raise ConfigError(
            f"cohort: got repeated party ids in {list(ordered)}", expected="unique", found=ordered
        )
    if not 2 <= len(ordered) <= config.max_participants:
        raise ConfigError(
            f"cohort: got {len(ordered)} parties, want 2..{config.max_participants} "
            "(raise SecAggConfig.max_participants, within its overflow check)",
            expected=(2, config.max_participants),
            found=len(ordered),
        )
    if ordered[0] < 0 or ordered[-1] > MAX_PARTY_ID:
        raise ConfigError(
            f"cohort: party ids must lie in 0..{MAX_PARTY_ID}, got {ordered[0]}..{ordered[-1]}",
            expected=(0, MAX_PARTY_ID),
            found=(ordered[0], ordered[-1]),
        )
    return ordered


@dataclass(frozen=True, kw_only=True)
class NeighbourGraph:
    """The neighbourhoods, share holders and Shamir thresholds of one window's cohort."""

    cohort: tuple[int, ...]
    neighbours: dict[int, frozenset[int]]
    threshold_fraction: float
    context: bytes  # `session_context`: what every signature of this window covers

    @classmethod
    def build(
        cls, *, cohort: Sequence[int], window: int, graph_seed: bytes, config: SecAggConfig
    ) -> NeighbourGraph:
        """Derive the graph from public inputs; raises ``ConfigError`` for a bad cohort."""
        members = validate_cohort(cohort, config)
        degree = graph_degree(len(members), config)
        ring = sorted(
            members,
            key=lambda party: hashlib.sha256(
                _GRAPH_DOMAIN
                + len(graph_seed).to_bytes(4, "big")
                + graph_seed
                + window.to_bytes(8, "big")
                + party.to_bytes(4, "big")
            ).digest(),
        )
        size = len(ring)
        neighbours: dict[int, frozenset[int]] = {}
        for position, party in enumerate(ring):
            if degree == size - 1:
                peers = set(members) - {party}
            else:
                peers = set()
                for step in range(1, degree // 2 + 1):
                    peers.add(ring[(position + step) % size])
                    peers.add(ring[(position - step) % size])
            neighbours[party] = frozenset(peers)
        return cls(
            cohort=members,
            neighbours=neighbours,
            threshold_fraction=config.threshold_fraction,
            context=session_context(graph_seed, window, members),
        )

    def of(self, party: int) -> frozenset[int]:
        """Neighbours of ``party`` (never itself); raises ``UnknownParty`` outside the cohort."""
        try:
            return self.neighbours[party]
        except KeyError:
            raise UnknownParty(
                f"party {party} is not in the cohort", expected=self.cohort, found=party
            ) from None

    def holders(self, party: int) -> frozenset[int]:
        """Who holds shares of ``party``'s secrets: its neighbours and ``party`` itself.

        As in Bonawitz et al. 2017 (Fig. 4, ShareKeys), a party shares its s key
        and self-mask seed among its whole neighbourhood *including itself* and
        keeps its own shares; raises ``UnknownParty`` outside the cohort.
        """
        return self.of(party) | {party}

    def threshold(self, party: int) -> int:
        """Shares of ``party``'s secrets needed to reconstruct them.

        ``t = floor(threshold_fraction * (degree + 1)) + 1``: a strict majority of
        the ``degree + 1`` holders (neighbours and the party itself), so that
        ``2 t > degree + 1``.
        """
        return math.floor(self.threshold_fraction * len(self.holders(party))) + 1

    def short_of(
        self, owners: Iterable[int], present: AbstractSet[int]
    ) -> tuple[int, int, int] | None:
        """The first owner (in order) whose secrets fewer than t holders in ``present`` hold,
        as ``(owner, have, t)``; None when every owner's secrets can be rebuilt."""
        for owner in sorted(owners):
            have, want = len(self.holders(owner) & present), self.threshold(owner)
            if have < want:
                return owner, have, want
        return None
