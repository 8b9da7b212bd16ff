"""One party of one secure-aggregation window (a device at level 1, a boundary at level 2).

The participant advertises fresh signed keys, Shamir-shares its s key and
self-mask seed t-out-of-(k + 1) among its k neighbours *and itself* (Bonawitz
et al. 2017, Fig. 4: it keeps its own seed share, and no share of its own is
ever encrypted or sent), masks its weighted, encoded vector, signs the survivor list the
aggregator announces, and releases unmasking shares only after the consistency
check: at least t valid signatures over that same list, its own among them.
For each peer it reveals one kind of share, never both; of its own secrets it
reveals only its share of its self-mask seed (it is a survivor whenever it
unmasks, so its seed is due anyway), never its share of its own s key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from enum import Enum, auto

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from numpy.typing import NDArray

from echelon.secagg import keys, shamir
from echelon.secagg.codec import encode
from echelon.secagg.config import SecAggConfig
from echelon.secagg.errors import (
    AbortedRound,
    ConfigError,
    ConsistencyError,
    DuplicateSubmission,
    InsufficientSignatures,
    InvalidSignature,
    StageError,
    UnknownParty,
    WrongWindow,
)
from echelon.secagg.graph import NeighbourGraph
from echelon.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    SharePlaintext,
    UnmaskingShares,
    check_window,
    survivor_list_bytes,
)
from echelon.secagg.prg import MaskGenerator


class ParticipantStage(Enum):
    """Where a participant is in its window; each method runs in exactly one stage."""

    ADVERTISE = auto()
    SHARE_KEYS = auto()
    RECEIVE_SHARES = auto()
    MASK = auto()
    SIGN_SURVIVORS = auto()
    UNMASK = auto()
    DONE = auto()


class Participant:
    """One party in one window; create a new one for every window (keys are fresh)."""

    def __init__(
        self,
        *,
        party_id: int,
        window: int,
        cohort: Sequence[int],
        identity: Ed25519PrivateKey,
        peer_identities: Mapping[int, Ed25519PublicKey],
        config: SecAggConfig,
        graph_seed: bytes,
    ) -> None:
        check_window("window", window)
        self.graph = NeighbourGraph.build(
            cohort=cohort, window=window, graph_seed=graph_seed, config=config
        )
        self.neighbours = self.graph.of(party_id)
        missing = sorted((self.neighbours | {party_id}) - set(peer_identities))
        if missing:
            raise ConfigError(
                f"peer_identities: no Ed25519 identity key for parties {missing}; "
                "pass the registered identity of every neighbour and of this party",
                expected="identity for every neighbour",
                found=missing,
            )
        own = identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        registered = peer_identities[party_id].public_bytes(Encoding.Raw, PublicFormat.Raw)
        if own != registered:
            raise ConfigError(
                f"identity: the key of party {party_id} is not the one in peer_identities; "
                "pass this party's registered identity key",
                expected=registered.hex(),
                found=own.hex(),
            )
        self.party_id = party_id
        self.window = window
        self.config = config
        self.threshold = self.graph.threshold(party_id)
        self._identity = identity
        self._peer_identities = dict(peer_identities)
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self._stage = ParticipantStage.ADVERTISE
        self._advertisement: KeyAdvertisement | None = None
        self._peer_ads: dict[int, KeyAdvertisement] = {}
        self._held: dict[int, SharePlaintext] = {}
        # This party's share of its own self-mask seed (b_{u,u}); its share of its
        # own s key is never released (it unmasks only as a survivor), so not kept.
        self._own_seed_share: bytes | None = None
        self._signed_survivors: tuple[int, ...] | None = None
        self._masks = MaskGenerator()

    @property
    def stage(self) -> ParticipantStage:
        """The stage the next call must belong to."""
        return self._stage

    @property
    def mask_peers(self) -> frozenset[int]:
        """Neighbours that exchanged shares with this party: exactly those it masks with."""
        return frozenset(self._held)

    def _require(self, wanted: ParticipantStage) -> None:
        # A call that fails validation leaves the stage as it was (nothing was
        # released); only AbortedRound ends the participant's window.
        if self._stage is not wanted:
            raise StageError(
                f"party {self.party_id}: called in stage {self._stage.name}, want {wanted.name}",
                expected=wanted,
                found=self._stage,
            )

    def advertise(self) -> KeyAdvertisement:
        """Return this window's signed key advertisement (c_pk, s_pk, seed commitment)."""
        self._require(ParticipantStage.ADVERTISE)
        c_pk, s_pk = keys.public_bytes(self._c_key), keys.public_bytes(self._s_key)
        commitment = keys.self_mask_commitment(self._seed, window=self.window, party=self.party_id)
        signed = KeyAdvertisement.signed_bytes_of(
            context=self.graph.context,
            window=self.window,
            party=self.party_id,
            c_pk=c_pk,
            s_pk=s_pk,
            self_mask_commitment=commitment,
        )
        self._advertisement = KeyAdvertisement(
            window=self.window,
            party=self.party_id,
            c_pk=c_pk,
            s_pk=s_pk,
            self_mask_commitment=commitment,
            signature=self._identity.sign(signed),
        )
        self._stage = ParticipantStage.SHARE_KEYS
        return self._advertisement

    def share_keys(self, ads: Mapping[int, KeyAdvertisement]) -> dict[int, EncryptedShare]:
        """Verify the relayed advertisements and encrypt shares for each advertised neighbour.

        The s key and the self-mask seed are split t-out-of-(advertised
        neighbours + 1): this party is a holder too and keeps its own shares, so
        the returned bundle has one ``EncryptedShare`` per advertised neighbour
        and none for itself. Raises ``InvalidSignature``/``WrongWindow``/
        ``UnknownParty`` for a bad advertisement, ``ConsistencyError`` when the
        relay altered this party's own, and ``AbortedRound`` when fewer than
        t - 1 neighbours advertised (fewer than t holders, itself included).
        """
        self._require(ParticipantStage.SHARE_KEYS)
        if ads.get(self.party_id) != self._advertisement:
            raise ConsistencyError(
                f"party {self.party_id}: the relayed advertisements omit or alter its own",
                expected=self._advertisement,
                found=ads.get(self.party_id),
            )
        peer_ads: dict[int, KeyAdvertisement] = {}
        for party in sorted(self.neighbours & set(ads)):
            ad = ads[party]
            keys.verify_advertisement(
                ad,
                party=party,
                window=self.window,
                identity=self._peer_identities[party],
                context=self.graph.context,
            )
            peer_ads[party] = ad
        if len(peer_ads) + 1 < self.threshold:
            self._stage = ParticipantStage.DONE
            raise AbortedRound(
                f"party {self.party_id}: {len(peer_ads)} neighbours advertised keys, so "
                f"{len(peer_ads) + 1} share holders with itself, want at least t = "
                f"{self.threshold}",
                expected=self.threshold,
                found=len(peer_ads) + 1,
            )
        self._peer_ads = peer_ads
        self._stage = ParticipantStage.RECEIVE_SHARES
        holders = sorted(peer_ads)
        key_shares = shamir.split(
            self._s_key.private_bytes_raw(),
            threshold=self.threshold,
            holders=[*holders, self.party_id],
        )
        seed_shares = shamir.split(
            self._seed, threshold=self.threshold, holders=[*holders, self.party_id]
        )
        self._own_seed_share = seed_shares[self.party_id]
        return {
            holder: keys.encrypt_share(
                SharePlaintext(
                    window=self.window,
                    owner=self.party_id,
                    holder=holder,
                    key_share=key_shares[holder],
                    seed_share=seed_shares[holder],
                ),
                sender_private=self._c_key,
                recipient_public=peer_ads[holder].c_pk,
                window=self.window,
                sender=self.party_id,
                recipient=holder,
            )
            for holder in holders
        }

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        """Decrypt the shares addressed to this party; all are checked before any is kept.

        Raises ``WrongWindow`` (replay), ``UnknownParty`` (not for us, or from a
        party we did not share with), ``DuplicateSubmission``,
        ``ShareAuthenticationError`` (AES-GCM failure) and ``AbortedRound`` when
        fewer than t - 1 neighbours exchanged shares with us (Bonawitz et al.'s
        ``|U2| >= t``, this party counted).
        """
        self._require(ParticipantStage.RECEIVE_SHARES)
        held: dict[int, SharePlaintext] = {}
        for share in shares:
            if share.window != self.window:
                raise WrongWindow(
                    f"share from party {share.sender}: window {share.window}, want {self.window}",
                    expected=self.window,
                    found=share.window,
                )
            if share.recipient != self.party_id:
                raise UnknownParty(
                    f"share addressed to party {share.recipient}, this is party {self.party_id}",
                    expected=self.party_id,
                    found=share.recipient,
                )
            if share.sender not in self._peer_ads:
                raise UnknownParty(
                    f"share from party {share.sender}, which is not an advertised neighbour",
                    expected=sorted(self._peer_ads),
                    found=share.sender,
                )
            if share.sender in held:
                raise DuplicateSubmission(
                    f"two shares from party {share.sender}", expected=1, found=2
                )
            held[share.sender] = keys.decrypt_share(
                share,
                recipient_private=self._c_key,
                sender_public=self._peer_ads[share.sender].c_pk,
            )
        if len(held) + 1 < self.threshold:
            self._stage = ParticipantStage.DONE
            raise AbortedRound(
                f"party {self.party_id}: {len(held)} neighbours shared keys with it, so "
                f"{len(held) + 1} parties with itself, want at least t = {self.threshold} "
                "to mask safely",
                expected=self.threshold,
                found=len(held) + 1,
            )
        self._held = held
        self._stage = ParticipantStage.MASK

    def mask(
        self, vector: NDArray[np.floating], weight: float, rng: np.random.Generator
    ) -> NDArray[np.uint32]:
        """Encode ``(weight * clip(vector), weight)`` and add the self mask and pairwise masks.

        Returns a uint32 vector of length ``len(vector) + 1``. ``rng`` drives
        only the stochastic rounding; masks come from ChaCha20. Raises
        ``InvalidContribution`` for a bad vector or weight.
        """
        self._require(ParticipantStage.MASK)
        masked = encode(vector, weight, self.config, rng)
        self._stage = ParticipantStage.SIGN_SURVIVORS
        self._masks.apply(
            masked,
            keys.self_mask_key(self._seed, window=self.window, party=self.party_id),
            sign=1,
        )
        for peer in sorted(self._held):
            key = keys.pairwise_mask_key(
                self._s_key,
                self._peer_ads[peer].s_pk,
                window=self.window,
                me=self.party_id,
                peer=peer,
            )
            self._masks.apply(masked, key, sign=keys.pairwise_sign(self.party_id, peer))
        return masked

    def _check_survivors(self, survivors: Sequence[int]) -> tuple[int, ...]:
        ordered = tuple(sorted(survivors))
        if len(set(ordered)) != len(ordered):
            raise ConsistencyError(
                f"survivor list repeats parties: {list(ordered)}", expected="unique", found=ordered
            )
        strangers = sorted(set(ordered) - set(self.graph.cohort))
        if strangers:
            raise UnknownParty(
                f"survivor list names parties {strangers} outside the cohort",
                expected=self.graph.cohort,
                found=strangers,
            )
        if self.party_id not in ordered:
            raise ConsistencyError(
                f"survivor list omits party {self.party_id}, which is asked to sign it",
                expected=self.party_id,
                found=ordered,
            )
        impossible = sorted((set(ordered) & self.neighbours) - self._held.keys())
        if impossible:
            raise ConsistencyError(
                f"survivor list names neighbours {impossible} that never exchanged shares with "
                f"party {self.party_id}, so no masked input of theirs can be valid",
                expected=sorted(self._held),
                found=impossible,
            )
        return ordered

    def sign_survivors(self, survivors: Sequence[int]) -> bytes:
        """Sign the announced survivor list (consistency check); at most once per window.

        Raises ``StageError`` if called before masking or a second time,
        ``UnknownParty``/``ConsistencyError`` for a list that cannot be right.
        """
        self._require(ParticipantStage.SIGN_SURVIVORS)
        ordered = self._check_survivors(survivors)
        self._signed_survivors = ordered
        self._stage = ParticipantStage.UNMASK
        return self._identity.sign(survivor_list_bytes(self.window, ordered, self.graph.context))

    def unmask(
        self,
        survivors: Sequence[int],
        signatures: Mapping[int, bytes],
        dropped: Sequence[int] | None = None,
    ) -> UnmaskingShares:
        """Release seed shares of surviving peers and key shares of dropped peers, once.

        The seed shares include this party's own share of its own seed (it is a
        survivor: the list it signed names it); it never releases a share of its
        own s key. ``survivors`` must be the list this party signed, and
        ``signatures`` must hold at least t valid signatures over it from the
        survivors among its k + 1 holders (its neighbours and itself), its own
        included; signatures of survivors outside the neighbourhood are neither
        counted nor verified. ``dropped``, when the aggregator names them, must
        not intersect the survivors. Raises ``ConsistencyError``,
        ``InvalidSignature``, ``UnknownParty`` or ``InsufficientSignatures``;
        nothing is released on error.
        """
        self._require(ParticipantStage.UNMASK)
        ordered = tuple(sorted(survivors))
        if ordered != self._signed_survivors:
            raise ConsistencyError(
                "unmasking request carries a survivor list other than the one signed",
                expected=self._signed_survivors,
                found=ordered,
            )
        if dropped is not None:
            alive = sorted(set(dropped) & set(ordered))
            if alive:
                raise ConsistencyError(
                    f"parties {alive} are named dropped but their masked inputs were delivered "
                    "(they are in the survivor list); refusing to reveal their keys",
                    expected="dropped disjoint from survivors",
                    found=alive,
                )
        payload = survivor_list_bytes(self.window, ordered, self.graph.context)
        strangers = sorted(set(signatures) - set(ordered))
        if strangers:
            raise UnknownParty(
                f"signatures from parties {strangers}, which are not in the survivor list",
                expected=ordered,
                found=strangers,
            )
        # Only signatures from this party's neighbourhood and itself count towards its t
        # (SecAgg+): those are the k + 1 holders of its shares, of which t is a strict
        # majority, so two lists cannot both reach t here; others are not verified.
        counted = set(signatures) & self.graph.holders(self.party_id)
        for signer in sorted(counted):
            if not keys.verify_signature(
                self._peer_identities[signer], signatures[signer], payload
            ):
                raise InvalidSignature(
                    f"survivor-list signature of party {signer} does not verify",
                    expected="valid Ed25519 signature",
                    found=signatures[signer].hex(),
                )
        if self.party_id not in signatures or len(counted) < self.threshold:
            raise InsufficientSignatures(
                f"party {self.party_id}: {len(counted)} valid survivor-list signatures from its "
                f"neighbourhood (own included: {self.party_id in signatures}), want t = "
                f"{self.threshold} including its own",
                expected=self.threshold,
                found=len(counted),
            )
        assert self._own_seed_share is not None  # set by share_keys, which MASK follows
        self._stage = ParticipantStage.DONE
        alive_set = set(ordered)
        seed_shares = {
            owner: held.seed_share for owner, held in self._held.items() if owner in alive_set
        }
        # b_{u,u}: this party is in the list it signed, so its seed is due (Bonawitz Fig. 4).
        seed_shares[self.party_id] = self._own_seed_share
        return UnmaskingShares(
            window=self.window,
            holder=self.party_id,
            self_mask_shares=tuple(sorted(seed_shares.items())),
            pairwise_key_shares=tuple(
                (owner, held.key_share)
                for owner, held in sorted(self._held.items())
                if owner not in alive_set
            ),
        )
