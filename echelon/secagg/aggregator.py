"""The aggregator of one secure-aggregation window (boundary agent at level 1, coordinator at 2).

It relays advertisements and encrypted shares it cannot read, adds masked
vectors into one uint32 accumulator as they arrive (whole or in chunks), fixes
the survivor set, collects survivor-list signatures and unmasking shares, and
finally removes the masks in place and decodes ``(sum w_i x_i, sum w_i)``.
Every submission is validated before it touches the accumulator, and
``finalize`` reconstructs and checks every secret before it removes any mask,
so a rejected message or an aborted round leaves the accumulator unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from numpy.typing import NDArray

from echelon.secagg import keys
from echelon.secagg.accumulator import MaskedSum
from echelon.secagg.codec import decode
from echelon.secagg.config import SecAggConfig
from echelon.secagg.errors import (
    ConfigError,
    ConsistencyError,
    DuplicateSubmission,
    InvalidSignature,
    SecAggError,
    StageError,
    UnknownParty,
    WrongWindow,
)
from echelon.secagg.graph import NeighbourGraph
from echelon.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    UnmaskingShares,
    check_window,
    survivor_list_bytes,
)
from echelon.secagg.prg import MaskGenerator
from echelon.secagg.unmasking import ShareBook


class AggregatorStage(Enum):
    """Where the aggregator is in its window."""

    ADVERTISE = auto()
    SHARE = auto()
    COLLECT = auto()
    CONSISTENCY = auto()
    UNMASK = auto()
    DONE = auto()
    ABORTED = auto()


_AFTER_COLLECTION = frozenset(
    {
        AggregatorStage.CONSISTENCY,
        AggregatorStage.UNMASK,
        AggregatorStage.DONE,
        AggregatorStage.ABORTED,
    }
)


class LateSubmission(StageError):
    """A masked vector arrived after the survivor set was fixed; it is rejected."""


@dataclass(frozen=True, kw_only=True)
class AggregateResult:
    """The unmasked sum: ``weighted_sum = sum_i w_i clip(x_i)``, ``weight_sum = sum_i w_i``.

    Each coordinate is within ``quantization_bound`` of the exact sum.
    """

    weighted_sum: NDArray[np.float64]
    weight_sum: float
    contributors: list[int]
    quantization_bound: float


class Aggregator:
    """Drives one window's aggregation in O(d) memory; create one per window."""

    def __init__(
        self,
        *,
        window: int,
        cohort: Sequence[int],
        dim: int,
        config: SecAggConfig,
        graph_seed: bytes,
        peer_identities: Mapping[int, Ed25519PublicKey],
    ) -> None:
        check_window("window", window)
        if dim < 1:
            raise ConfigError(f"dim: got {dim}, want >= 1", expected=">= 1", found=dim)
        self.graph = NeighbourGraph.build(
            cohort=cohort, window=window, graph_seed=graph_seed, config=config
        )
        missing = sorted(set(self.graph.cohort) - set(peer_identities))
        if missing:
            raise ConfigError(
                f"peer_identities: no Ed25519 identity key for parties {missing}",
                expected="identity for every cohort member",
                found=missing,
            )
        self.window = window
        self.dim = dim
        self.config = config
        self._identities = dict(peer_identities)
        self._stage = AggregatorStage.ADVERTISE
        self._ads: dict[int, KeyAdvertisement] = {}
        self._outbox: dict[int, dict[int, EncryptedShare]] = {}
        self._sharers: frozenset[int] = frozenset()
        self._sum = MaskedSum(dim + 1)
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._book: ShareBook | None = None

    @property
    def stage(self) -> AggregatorStage:
        """The stage the next call must belong to."""
        return self._stage

    @property
    def masked_total(self) -> NDArray[np.uint32]:
        """Read-only view of the accumulator (masked until ``finalize``)."""
        view = self._sum.total.view()
        view.flags.writeable = False
        return view

    @property
    def open_streams(self) -> int:
        """Chunked submissions in progress, each holding one staging vector."""
        return self._sum.open_streams

    def _require(self, *wanted: AggregatorStage) -> None:
        if self._stage not in wanted:
            raise StageError(
                f"aggregator: called in stage {self._stage.name}, "
                f"want {' or '.join(w.name for w in wanted)}",
                expected=wanted,
                found=self._stage,
            )

    def _check_member(self, party: int) -> None:
        if party not in self.graph.neighbours:
            raise UnknownParty(
                f"party {party} is not in the cohort of window {self.window}",
                expected=self.graph.cohort,
                found=party,
            )

    # -- keys --------------------------------------------------------------------------------

    def add_advertisement(self, party: int, ad: KeyAdvertisement) -> None:
        """Accept one party's signed advertisement (checked against its identity key)."""
        self._require(AggregatorStage.ADVERTISE)
        self._check_member(party)
        if party in self._ads:
            raise DuplicateSubmission(f"second advertisement of party {party}", expected=1, found=2)
        keys.verify_advertisement(
            ad,
            party=party,
            window=self.window,
            identity=self._identities[party],
            context=self.graph.context,
        )
        self._ads[party] = ad

    def close_advertisements(self) -> dict[int, KeyAdvertisement]:
        """End the advertisement stage; returns the advertisements to relay to every party."""
        self._require(AggregatorStage.ADVERTISE)
        self._stage = AggregatorStage.SHARE
        return dict(self._ads)

    def add_shares(self, sender: int, shares: Mapping[int, EncryptedShare]) -> None:
        """Accept a sender's encrypted shares, one per advertised neighbour, to relay them."""
        self._require(AggregatorStage.SHARE)
        self._check_member(sender)
        if sender not in self._ads:
            raise UnknownParty(
                f"shares from party {sender}, which did not advertise keys",
                expected=sorted(self._ads),
                found=sender,
            )
        if sender in self._outbox:
            raise DuplicateSubmission(f"second share bundle of party {sender}", expected=1, found=2)
        wanted = self.graph.of(sender) & self._ads.keys()
        if set(shares) != wanted:
            raise ConsistencyError(
                f"party {sender} sent shares for {sorted(shares)}, want its advertised "
                f"neighbours {sorted(wanted)}",
                expected=sorted(wanted),
                found=sorted(shares),
            )
        for recipient, share in shares.items():
            if share.window != self.window:
                raise WrongWindow(
                    f"share from party {sender}: window {share.window}, want {self.window}",
                    expected=self.window,
                    found=share.window,
                )
            if (share.sender, share.recipient) != (sender, recipient):
                raise ConsistencyError(
                    f"share filed as {sender}->{recipient} is {share.sender}->{share.recipient}",
                    expected=(sender, recipient),
                    found=(share.sender, share.recipient),
                )
        self._outbox[sender] = dict(shares)

    def route_shares(self) -> dict[int, list[EncryptedShare]]:
        """End share collection; returns, per recipient, the shares it must receive.

        Only parties that sent their shares take part from here on: a share
        from or to a party that did not is dropped.
        """
        self._require(AggregatorStage.SHARE)
        self._sharers = frozenset(self._outbox)
        self._stage = AggregatorStage.COLLECT
        routed: dict[int, list[EncryptedShare]] = {party: [] for party in sorted(self._sharers)}
        for sender in sorted(self._sharers):
            for recipient, share in sorted(self._outbox[sender].items()):
                if recipient in self._sharers:
                    routed[recipient].append(share)
        self._outbox.clear()
        return routed

    # -- masked vectors ----------------------------------------------------------------------

    def add_masked_chunk(self, party: int, offset: int, chunk: NDArray[np.uint32]) -> None:
        """Add coordinates ``[offset, offset + len(chunk))`` of a party's masked vector.

        Chunks of one party arrive in order; a vector in one chunk goes straight
        into the accumulator, one in several is staged until complete (see
        ``MaskedSum``). Raises ``LateSubmission`` after ``fix_survivors``,
        ``UnknownParty``, ``DuplicateSubmission`` and ``LengthMismatch``; a
        rejected chunk changes nothing.
        """
        self._check_submitter(party)
        self._sum.add_chunk(party, offset, chunk)

    def add_masked(self, party: int, vector: NDArray[np.uint32]) -> None:
        """Add a party's whole masked vector (length ``dim + 1``); see ``add_masked_chunk``."""
        self._check_submitter(party)
        self._sum.add_whole(party, vector)

    def _check_submitter(self, party: int) -> None:
        if self._stage in _AFTER_COLLECTION:
            raise LateSubmission(
                f"masked vector of party {party} after the survivor set was fixed",
                expected=AggregatorStage.COLLECT,
                found=self._stage,
            )
        self._require(AggregatorStage.COLLECT)
        self._check_member(party)
        if party not in self._sharers:
            raise UnknownParty(
                f"masked vector of party {party}, which did not share its keys",
                expected=sorted(self._sharers),
                found=party,
            )

    def fix_survivors(self) -> list[int]:
        """End collection: the parties whose whole vector arrived are the survivors.

        Unfinished chunked streams are discarded (those parties count as
        dropped). Raises ``AbortedRound`` when the survivors cannot hold enough
        shares to remove every mask; the round is then over.
        """
        self._require(AggregatorStage.COLLECT)
        self._survivors = self._sum.close()
        self._stage = AggregatorStage.CONSISTENCY
        book = ShareBook(graph=self.graph, sharers=self._sharers, survivors=self._survivors)
        shortfall = book.shortfall()
        if shortfall is not None:
            self._stage = AggregatorStage.ABORTED
            raise shortfall
        self._book = book
        return list(self._survivors)

    @property
    def secrets_due(self) -> frozenset[int]:
        """After ``fix_survivors``: the owners whose secret unmasking must rebuild (survivors'
        seeds, keys of dropped parties whose masks a survivor added)."""
        if self._book is None:
            raise StageError(
                "secrets_due: the survivors are not fixed yet",
                expected="after fix_survivors",
                found=self._stage,
            )
        return self._book.secrets_due

    # -- consistency check and unmasking -----------------------------------------------------

    def add_survivor_signature(self, party: int, signature: bytes) -> None:
        """Accept a survivor's Ed25519 signature over the announced survivor list."""
        self._require(AggregatorStage.CONSISTENCY)
        if party not in self._survivors:
            raise UnknownParty(
                f"survivor-list signature from party {party}, which is not a survivor",
                expected=self._survivors,
                found=party,
            )
        if party in self._signatures:
            raise DuplicateSubmission(f"second signature of party {party}", expected=1, found=2)
        payload = survivor_list_bytes(self.window, self._survivors, self.graph.context)
        if not keys.verify_signature(self._identities[party], signature, payload):
            raise InvalidSignature(
                f"survivor-list signature of party {party} does not verify",
                expected="valid Ed25519 signature",
                found=signature.hex(),
            )
        self._signatures[party] = signature

    def survivor_signatures(self) -> dict[int, bytes]:
        """The signatures collected so far, to relay with the unmasking request."""
        return dict(self._signatures)

    def add_unmasking_shares(self, party: int, shares: UnmaskingShares) -> None:
        """Accept a survivor's released shares; rejects any share it must not have revealed."""
        self._require(AggregatorStage.CONSISTENCY, AggregatorStage.UNMASK)
        if party not in self._signatures:
            raise ConsistencyError(
                f"unmasking shares from party {party}, which did not sign the survivor list",
                expected=sorted(self._signatures),
                found=party,
            )
        if shares.window != self.window:
            raise WrongWindow(
                f"unmasking shares of party {party}: window {shares.window}, want {self.window}",
                expected=self.window,
                found=shares.window,
            )
        if shares.holder != party:
            raise UnknownParty(
                f"unmasking shares filed under party {party} are from party {shares.holder}",
                expected=party,
                found=shares.holder,
            )
        assert self._book is not None  # set by fix_survivors, which CONSISTENCY follows
        self._book.add(shares)
        self._stage = AggregatorStage.UNMASK

    def finalize(self) -> AggregateResult:
        """Reconstruct and check every needed secret, then remove the masks and decode.

        Raises ``AbortedRound`` when too few shares arrived and
        ``ShareReconstructionError`` when a reconstructed secret does not match
        its advertised public value; in both cases the round ends and the
        accumulator is untouched.
        """
        self._require(AggregatorStage.UNMASK)
        assert self._book is not None
        survivors = set(self._survivors)
        try:
            seeds = self._book.reconstruct_seeds(self._ads)
            private_keys = self._book.reconstruct_keys(self._ads)
            # (key, sign) of every mask to remove, all derived before the first one is removed.
            removals = [
                (keys.self_mask_key(seed, window=self.window, party=party), -1)
                for party, seed in seeds.items()
            ]
            for dropped, private in private_keys.items():
                for peer in sorted(self.graph.of(dropped) & survivors & self._sharers):
                    key = keys.pairwise_mask_key(
                        private, self._ads[peer].s_pk, window=self.window, me=dropped, peer=peer
                    )
                    # The survivor added pairwise_sign(peer, dropped) * PRG; undo it.
                    removals.append((key, -keys.pairwise_sign(peer, dropped)))
        except SecAggError:
            self._stage = AggregatorStage.ABORTED
            raise
        masks = MaskGenerator()
        for key, sign in removals:
            masks.apply(self._sum.total, key, sign=sign)
        self._stage = AggregatorStage.DONE
        weighted_sum, weight_sum = decode(self._sum.total, self.config)
        return AggregateResult(
            weighted_sum=weighted_sum,
            weight_sum=weight_sum,
            contributors=list(self._survivors),
            quantization_bound=self.config.quantization_bound(len(self._survivors)),
        )
