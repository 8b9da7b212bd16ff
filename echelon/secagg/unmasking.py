"""Bookkeeping of the unmasking round: which shares are due, which arrived, and the secrets.

The aggregator needs the self-mask seed of every survivor and the s key of
every dropped party that has a surviving neighbour; each is rebuilt from t
shares released by its surviving holders. A party's holders are its neighbours
and itself, so a survivor's seed comes from its surviving neighbours *and the
survivor's own share of its own seed*; a dropped party's key comes from its
surviving neighbours only (it released nothing). A share of the wrong kind (a
key share of a survivor, a seed share of a dropped party) is refused, and so
is a share of a party's own key from itself, so the aggregator never holds
both secrets of one party.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from echelon.secagg import keys, shamir
from echelon.secagg.errors import (
    AbortedRound,
    DuplicateSubmission,
    ShareReconstructionError,
    UnexpectedShare,
)
from echelon.secagg.graph import NeighbourGraph
from echelon.secagg.messages import KeyAdvertisement, UnmaskingShares


class ShareBook:
    """Collects unmasking shares for one window and rebuilds the secrets they protect."""

    def __init__(
        self, *, graph: NeighbourGraph, sharers: Iterable[int], survivors: Iterable[int]
    ) -> None:
        self.graph = graph
        self.sharers = frozenset(sharers)
        self.survivors = frozenset(survivors)
        self.dropped = self.sharers - self.survivors
        # Dropped parties with no surviving neighbour left no mask in the sum.
        self.keys_needed = frozenset(
            party for party in self.dropped if self.graph.of(party) & self.survivors
        )
        self._holders: set[int] = set()
        self._seed_shares: dict[int, dict[int, bytes]] = {p: {} for p in self.survivors}
        self._key_shares: dict[int, dict[int, bytes]] = {p: {} for p in self.keys_needed}

    def shortfall(self) -> AbortedRound | None:
        """The abort to raise when the survivors cannot release enough shares, else None."""
        if not self.survivors:
            return AbortedRound("no masked vector arrived", expected=">= 1 survivor", found=0)
        # Holders that can release: surviving neighbours, plus the owner itself when it
        # survived (it holds b_{u,u}); a dropped owner is no survivor, so it never counts.
        short = self.graph.short_of(self.secrets_due, self.sharers & self.survivors)
        if short is None:
            return None
        owner, available, needed = short
        kind = "self-mask seed" if owner in self.survivors else "s key"
        return AbortedRound(
            f"only {available} surviving holders (neighbours and the party itself) "
            f"hold shares of the {kind} of party {owner}, want t = {needed}",
            expected=needed,
            found=available,
        )

    @property
    def secrets_due(self) -> frozenset[int]:
        """Owners whose secret must be rebuilt: survivors' seeds, needed dropped keys."""
        return self.survivors | self.keys_needed

    def add(self, shares: UnmaskingShares) -> None:
        """Record one survivor's shares after checking each is due; all or nothing.

        Seed shares are due for surviving neighbours of ``holder`` and for the
        holder itself (its own share of its own seed); key shares only for
        dropped neighbours, never for the holder itself (it is a survivor).
        """
        holder = shares.holder
        if holder in self._holders:
            raise DuplicateSubmission(
                f"second unmasking shares of party {holder}", expected=1, found=2
            )
        peers = self.graph.of(holder) & self.sharers
        seed_owners = (peers | {holder}) & self.survivors
        for owner, _ in shares.self_mask_shares:
            if owner not in seed_owners:
                raise UnexpectedShare(
                    f"party {holder} released a self-mask share of party {owner}, which is "
                    "neither a surviving neighbour of it nor itself as a survivor",
                    expected=sorted(seed_owners),
                    found=owner,
                )
        for owner, _ in shares.pairwise_key_shares:
            if owner not in self.dropped or owner not in peers:
                raise UnexpectedShare(
                    f"party {holder} released an s-key share of party {owner}, which did not "
                    "drop (or is no neighbour of it): revealing it could unmask its input",
                    expected=sorted(peers & self.dropped),
                    found=owner,
                )
        self._holders.add(holder)
        for owner, share in shares.self_mask_shares:
            self._seed_shares[owner][holder] = share
        for owner, share in shares.pairwise_key_shares:
            if owner in self._key_shares:
                self._key_shares[owner][holder] = share

    def _rebuild(self, owner: int, shares: dict[int, bytes], kind: str) -> bytes:
        needed = self.graph.threshold(owner)
        if len(shares) < needed:
            raise AbortedRound(
                f"{len(shares)} shares of the {kind} of party {owner} arrived, want t = {needed}",
                expected=needed,
                found=len(shares),
            )
        chosen = {holder: shares[holder] for holder in sorted(shares)[:needed]}
        return shamir.reconstruct(chosen)

    def reconstruct_seeds(self, ads: Mapping[int, KeyAdvertisement]) -> dict[int, bytes]:
        """Self-mask seed of every survivor, each checked against its advertised commitment.

        Raises ``AbortedRound`` when shares are missing and
        ``ShareReconstructionError`` when a rebuilt seed does not match.
        """
        seeds: dict[int, bytes] = {}
        for owner, shares in sorted(self._seed_shares.items()):
            seed = self._rebuild(owner, shares, "self-mask seed")
            ad = ads[owner]
            commitment = keys.self_mask_commitment(seed, window=ad.window, party=owner)
            if commitment != ad.self_mask_commitment:
                raise ShareReconstructionError(
                    f"self-mask seed of party {owner} rebuilt from shares does not match its "
                    "commitment",
                    expected=ad.self_mask_commitment.hex(),
                    found=commitment.hex(),
                )
            seeds[owner] = seed
        return seeds

    def reconstruct_keys(self, ads: Mapping[int, KeyAdvertisement]) -> dict[int, X25519PrivateKey]:
        """s key of every dropped party that masked with a survivor, checked against its s_pk.

        Raises ``AbortedRound`` when shares are missing and
        ``ShareReconstructionError`` when a rebuilt key does not match.
        """
        private_keys: dict[int, X25519PrivateKey] = {}
        for owner, shares in sorted(self._key_shares.items()):
            private = X25519PrivateKey.from_private_bytes(self._rebuild(owner, shares, "s key"))
            public = keys.public_bytes(private)
            if public != ads[owner].s_pk:
                raise ShareReconstructionError(
                    f"s key of party {owner} rebuilt from shares does not match its advertisement",
                    expected=ads[owner].s_pk.hex(),
                    found=public.hex(),
                )
            private_keys[owner] = private
        return private_keys
