"""One secure-aggregation round runner, sans-IO, for both levels and every executor.

`AggregatorRounds` is the aggregator's side of one window (the coordinator over boundary
agents, or an agent over its devices): it takes the parties' messages as they arrive and
returns the messages to send, advancing through the stages (keys, shares, collection,
survivor-list consistency check, unmasking) when everyone it waits for has answered, or
when the owner says a stage's time is up. `PartyRounds` is a party's side. With level 2
off (a baseline), only collection runs, over plain float vectors.

Any failure of a party (bytes that do not parse, a bad signature, a vector of the wrong
length or type, a message for another window or stage, silence) is that party's failure:
it is recorded with a reason and the round goes on without it. The round ends without a
result (ABORTED, `aborted` says why) when too few parties remain: fewer than the owner's
`min_parties` (its k_min), or too few holders or signers to remove every mask (the library's
threshold t). The latter is checked before each stage's messages go out, so a round that
cannot complete is refused before any unmasking share is released.

Event-driven executors (the coordinator, the simulator) call the round directly; a blocking
one drives it with `echelon.device.drive.run_rounds` over a transport (level 1's pipes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from enum import Enum, auto

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.aggregation import AggregationError, PlainAggregator, WindowSum
from echelon.protocol.messages import (
    ContributionSent,
    KeysAdvertised,
    KeysRelayed,
    SharesRelayed,
    SharesReleased,
    SharesSent,
    SurvivorsAnnounced,
    SurvivorsSigned,
    UnmaskRequested,
)
from echelon.secagg import (
    Aggregator,
    EncryptedShare,
    KeyAdvertisement,
    Participant,
    SecAggConfig,
    SecAggError,
    UnmaskingShares,
)


class RoundStage(Enum):
    KEYS = auto()
    SHARES = auto()
    COLLECT = auto()
    CONFIRM = auto()
    UNMASK = auto()
    DONE = auto()
    ABORTED = auto()


RoundReply = KeysRelayed | SharesRelayed | SurvivorsAnnounced | UnmaskRequested
PartyMessage = KeysAdvertised | SharesSent | ContributionSent | SurvivorsSigned | SharesReleased


@dataclass(frozen=True)
class Outbound:
    """A message the round's owner must send to `party`."""

    party: int
    message: RoundReply


class PartyRefused(Exception):
    """A party's message was refused; the party is out of the round."""


@dataclass(frozen=True, kw_only=True)
class RoundAborted:
    """Why a round ended without a result: `expected` parties (holders, signers) were
    needed, `found` remained (-1 when unknown); `below_minimum` when fewer than the owner's
    `min_parties` remained (its policy), else the library's threshold could not be met."""

    reason: str
    expected: int
    found: int
    below_minimum: bool = False


class _Short(Exception):
    def __init__(self, aborted: RoundAborted) -> None:
        super().__init__(aborted.reason)
        self.aborted = aborted


_EXPECTED: dict[RoundStage, type] = {
    RoundStage.KEYS: KeysAdvertised,
    RoundStage.SHARES: SharesSent,
    RoundStage.COLLECT: ContributionSent,
    RoundStage.CONFIRM: SurvivorsSigned,
    RoundStage.UNMASK: SharesReleased,
}


class AggregatorRounds:
    """The aggregator's side of one window's secure aggregation (or plain sum)."""

    def __init__(
        self,
        *,
        window: int,
        cohort: Sequence[int],
        length: int,
        config: SecAggConfig | None,
        graph_seed: bytes = b"",
        identities: Mapping[int, Ed25519PublicKey] | None = None,
        min_parties: int = 1,
    ) -> None:
        """`length` is the contribution's unweighted length (the vector is `length + 1`
        with the weight); `config` None means level 2 off (plain float sums). A secure round
        with fewer than `min_parties` parties left (keys, shares, vectors) is aborted."""
        self.window = window
        self.cohort = tuple(sorted(cohort))
        self.length = length
        self.secure = config is not None
        self.min_parties = min_parties
        self.failed: dict[int, str] = {}
        self.aborted: RoundAborted | None = None
        self.result: WindowSum | None = None
        self.error_bound = 0.0  # of one coordinate of `result.weighted_sum` (quantization)
        self._answered: set[int] = set()
        self._collected: set[int] = set()
        self._plain: PlainAggregator | None = None
        self._agg: Aggregator | None = None
        self._survivors: tuple[int, ...] = ()
        self._signers: tuple[int, ...] = ()
        if config is None:
            self._plain = PlainAggregator(cohort=self.cohort, dim=length)
            self.stage = RoundStage.COLLECT
        else:
            self._agg = Aggregator(
                window=window,
                cohort=self.cohort,
                dim=length,
                config=config,
                graph_seed=graph_seed,
                peer_identities=dict(identities or {}),
            )
            self.stage = RoundStage.KEYS
        self._expected: tuple[int, ...] = self.cohort

    # -- what the round waits for -----------------------------------------------------------
    @property
    def awaiting(self) -> frozenset[int]:
        """Parties the current stage still waits for."""
        if self.stage in (RoundStage.DONE, RoundStage.ABORTED):
            return frozenset()
        return frozenset(self._expected) - self._answered - set(self.failed)

    @property
    def collected(self) -> frozenset[int]:
        return frozenset(self._collected)

    @property
    def finished(self) -> bool:
        return self.stage in (RoundStage.DONE, RoundStage.ABORTED)

    @property
    def abort_reason(self) -> str | None:
        return None if self.aborted is None else self.aborted.reason

    # -- events ----------------------------------------------------------------------------
    def receive(self, party: int, message: PartyMessage) -> list[Outbound]:
        """Takes one party's message; a refused one puts the party out (see `failed`)."""
        try:
            self._accept(party, message)
        except (PartyRefused, SecAggError, AggregationError, ValueError) as exc:
            self.failed.setdefault(party, f"{type(exc).__name__}: {exc}")
        return self._advance_if_complete()

    def fail(self, party: int, reason: str) -> list[Outbound]:
        """A party failed outside the round (disconnected, timed out, declined)."""
        if party in self.cohort:
            self.failed.setdefault(party, reason)
        return self._advance_if_complete()

    def expire(self) -> list[Outbound]:
        """The current stage's time is up: go on with the parties that answered."""
        for party in self.awaiting:
            self.failed.setdefault(party, f"no answer in stage {self.stage.name}")
        if self.stage is RoundStage.COLLECT:
            return []
        return self._advance()

    def close_collection(self) -> list[Outbound]:
        """Ends collection (the owner's close decision): survivors are fixed."""
        if self.stage is not RoundStage.COLLECT:
            return []
        return self._advance()

    # -- internals -------------------------------------------------------------------------
    def _accept(self, party: int, message: PartyMessage) -> None:
        if party not in self.cohort:
            raise PartyRefused(f"party {party} is not in the cohort {list(self.cohort)}")
        if message.window != self.window:
            raise PartyRefused(f"message for window {message.window}, want {self.window}")
        want = _EXPECTED.get(self.stage)
        if want is None or not isinstance(message, want):
            raise PartyRefused(
                f"{type(message).__name__} in stage {self.stage.name}, want "
                f"{want.__name__ if want else 'nothing'}"
            )
        if party in self.failed:
            raise PartyRefused(f"party {party} already failed: {self.failed[party]}")
        if party not in self._expected or party in self._answered:
            raise PartyRefused(f"party {party}: unexpected or duplicate {type(message).__name__}")
        if isinstance(message, KeysAdvertised):
            assert self._agg is not None
            self._agg.add_advertisement(party, KeyAdvertisement.from_bytes(message.advertisement))
        elif isinstance(message, SharesSent):
            assert self._agg is not None
            parsed = [EncryptedShare.from_bytes(s) for s in message.shares]
            by_recipient = {s.recipient: s for s in parsed}
            if len(by_recipient) != len(parsed):
                raise PartyRefused(f"party {party}: two shares for one recipient")
            self._agg.add_shares(party, by_recipient)
        elif isinstance(message, ContributionSent):
            self._add_vector(party, message.vector)
            self._collected.add(party)
        elif isinstance(message, SurvivorsSigned):
            assert self._agg is not None
            self._agg.add_survivor_signature(party, message.signature)
        else:
            assert self._agg is not None
            self._agg.add_unmasking_shares(party, UnmaskingShares.from_bytes(message.shares))
        self._answered.add(party)

    def _add_vector(self, party: int, vector: np.ndarray) -> None:
        if vector.shape != (self.length + 1,):
            raise PartyRefused(f"vector of shape {vector.shape}, want ({self.length + 1},)")
        if self._plain is not None:
            if vector.dtype.kind != "f":
                raise PartyRefused(f"vector of dtype {vector.dtype}, want float (level 2 off)")
            self._plain.add(party, vector.astype(np.float64))
        else:
            assert self._agg is not None
            if vector.dtype != np.uint32:
                raise PartyRefused(f"vector of dtype {vector.dtype}, want uint32 (masked)")
            self._agg.add_masked(party, vector)

    def _advance_if_complete(self) -> list[Outbound]:
        if self.finished or self.awaiting or self.stage is RoundStage.COLLECT:
            return []
        return self._advance()

    def _set_stage(self, stage: RoundStage, expected: Sequence[int]) -> None:
        self.stage = stage
        self._expected = tuple(sorted(expected))
        self._answered = set()

    def _abort(self, aborted: RoundAborted) -> list[Outbound]:
        self.stage = RoundStage.ABORTED
        self.aborted = aborted
        return []

    def _advance(self) -> list[Outbound]:
        try:
            return self._next_stage()
        except _Short as short:
            return self._abort(short.aborted)
        except SecAggError as exc:
            reason = f"secure aggregation aborted: {exc}"
            return self._abort(
                RoundAborted(
                    reason=reason, expected=_as_int(exc.expected), found=_as_int(exc.found)
                )
            )

    def _require(self, present: Set[int], what: str) -> None:
        """Raises _Short when `present` has fewer than `min_parties` parties."""
        if len(present) < self.min_parties:
            raise _Short(
                RoundAborted(
                    reason=f"{len(present)} {what}, want >= {self.min_parties}",
                    expected=self.min_parties,
                    found=len(present),
                    below_minimum=True,
                )
            )

    def _require_holders(self, owners: Set[int], holders: Set[int], what: str) -> None:
        """Raises _Short unless each owner's secret has t holders among `holders`."""
        assert self._agg is not None
        short = self._agg.graph.short_of(owners, holders)
        if short is not None:
            owner, have, want = short
            raise _Short(
                RoundAborted(
                    reason=f"secure aggregation cannot complete: {what}: party {owner} has "
                    f"{have} of the {want} holders it needs",
                    expected=want,
                    found=have,
                )
            )

    def _next_stage(self) -> list[Outbound]:
        w = self.window
        if self.stage is RoundStage.KEYS:
            assert self._agg is not None
            ads = self._agg.close_advertisements()
            present = set(ads) - set(self.failed)
            self._require(present, "parties advertised keys")
            self._require_holders(present, present, "advertised keys")
            relayed = tuple(ad.to_bytes() for _, ad in sorted(ads.items()))
            self._set_stage(RoundStage.SHARES, sorted(ads))
            return [Outbound(p, KeysRelayed(window=w, advertisements=relayed)) for p in sorted(ads)]
        if self.stage is RoundStage.SHARES:
            assert self._agg is not None
            routed = self._agg.route_shares()
            present = set(routed) - set(self.failed)
            self._require(present, "parties exchanged shares")
            self._require_holders(present, present, "exchanged shares")
            self._set_stage(RoundStage.COLLECT, sorted(routed))
            return [
                Outbound(p, SharesRelayed(window=w, shares=tuple(s.to_bytes() for s in shares)))
                for p, shares in sorted(routed.items())
            ]
        if self.stage is RoundStage.COLLECT:
            if self._plain is not None:
                self._plain.fix_survivors()
                self.result = self._plain.finalize()
                self.stage = RoundStage.DONE
                return []
            assert self._agg is not None
            self._require(self._collected, "masked vectors")
            self._survivors = tuple(self._agg.fix_survivors())
            self._set_stage(RoundStage.CONFIRM, self._survivors)
            return [
                Outbound(p, SurvivorsAnnounced(window=w, survivors=self._survivors))
                for p in self._survivors
            ]
        if self.stage is RoundStage.CONFIRM:
            assert self._agg is not None
            signatures = self._agg.survivor_signatures()
            self._set_stage(RoundStage.UNMASK, sorted(signatures))
            if not signatures:
                raise _Short(
                    RoundAborted(reason="no survivor signed the survivor list", expected=1, found=0)
                )
            signers = set(signatures) - set(self.failed)
            self._require_holders(signers, signers, "survivor signatures")
            self._require_holders(self._agg.secrets_due, signers, "signers holding shares")
            request = UnmaskRequested(
                window=w, survivors=self._survivors, signatures=tuple(sorted(signatures.items()))
            )
            return [Outbound(p, request) for p in sorted(signatures)]
        if self.stage is RoundStage.UNMASK:
            assert self._agg is not None
            result = self._agg.finalize()
            self.result = WindowSum(
                weighted_sum=result.weighted_sum,
                weight_sum=result.weight_sum,
                contributors=tuple(result.contributors),
            )
            self.error_bound = result.quantization_bound
            self.stage = RoundStage.DONE
            return []
        return []

    @property
    def survivors(self) -> tuple[int, ...]:
        """After collection: the parties whose vectors are in the sum."""
        if self._plain is not None:
            return tuple(sorted(self._collected))
        return self._survivors


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else -1


class PartyRounds:
    """One party's side of one window's secure aggregation (or plain contribution)."""

    def __init__(
        self,
        *,
        party: int,
        window: int,
        cohort: Sequence[int],
        config: SecAggConfig,
        secure: bool,
        identity: Ed25519PrivateKey | None = None,
        identities: Mapping[int, Ed25519PublicKey] | None = None,
        graph_seed: bytes = b"",
    ) -> None:
        self.party = party
        self.window = window
        self.config = config
        self._participant: Participant | None = None
        self.keys_ready = not secure
        self.contributed = False
        if secure:
            if identity is None:
                raise ValueError("PartyRounds: level 2 needs this party's identity key")
            self._participant = Participant(
                party_id=party,
                window=window,
                cohort=cohort,
                identity=identity,
                peer_identities=dict(identities or {}),
                config=config,
                graph_seed=graph_seed,
            )

    def _check(self, window: int) -> Participant:
        if window != self.window:
            raise PartyRefused(f"message for window {window}, want {self.window}")
        if self._participant is None:
            raise PartyRefused("a key-round message in a window with level 2 off")
        return self._participant

    def advertise(self) -> KeysAdvertised | None:
        """The window's signed key advertisement; None with level 2 off."""
        if self._participant is None:
            return None
        return KeysAdvertised(
            window=self.window, advertisement=self._participant.advertise().to_bytes()
        )

    def on_keys(self, message: KeysRelayed) -> SharesSent:
        """Raises PartyRefused or SecAggError when the relayed keys are refused."""
        participant = self._check(message.window)
        ads: dict[int, KeyAdvertisement] = {}
        for raw in message.advertisements:
            ad = KeyAdvertisement.from_bytes(raw)
            if ad.party in ads:
                raise PartyRefused(f"two advertisements of party {ad.party}")
            ads[ad.party] = ad
        shares = participant.share_keys(ads)
        return SharesSent(
            window=self.window, shares=tuple(s.to_bytes() for _, s in sorted(shares.items()))
        )

    def on_shares(self, message: SharesRelayed) -> None:
        participant = self._check(message.window)
        participant.receive_shares([EncryptedShare.from_bytes(s) for s in message.shares])
        self.keys_ready = True

    def contribute(
        self,
        x: np.ndarray,
        weight: float,
        rng: np.random.Generator,
        *,
        base_version: int,
        devices: int,
    ) -> ContributionSent:
        """Masks (level 2) or weights (baseline) `x`; once per window."""
        if self.contributed or not self.keys_ready:
            raise PartyRefused(
                f"window {self.window}: contributed={self.contributed}, keys ready="
                f"{self.keys_ready}; want one contribution after the key rounds"
            )
        if self._participant is not None:
            vector = self._participant.mask(x, weight, rng)
        else:
            clipped = np.clip(x.astype(np.float64), -self.config.clip, self.config.clip)
            vector = np.append(clipped * weight, weight)
        self.contributed = True
        return ContributionSent(
            window=self.window, base_version=base_version, devices=devices, vector=vector
        )

    def on_survivors(self, message: SurvivorsAnnounced) -> SurvivorsSigned:
        participant = self._check(message.window)
        return SurvivorsSigned(
            window=self.window, signature=participant.sign_survivors(message.survivors)
        )

    def on_unmask(self, message: UnmaskRequested) -> SharesReleased:
        participant = self._check(message.window)
        shares = participant.unmask(message.survivors, dict(message.signatures))
        return SharesReleased(window=self.window, shares=shares.to_bytes())


__all__ = [
    "AggregatorRounds",
    "Outbound",
    "PartyRefused",
    "PartyRounds",
    "RoundAborted",
    "RoundStage",
]
