"""Level-2 secure aggregation on the agent's side: one `Participant` per window.

With level 2 switched off (a baseline run), the agent's contribution crosses as a
plain weighted vector and the key rounds answer FAILED_PRECONDITION.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echelon.secagg import Participant, UnmaskingShares
from echelon_proto.boundary.v1 import boundary_pb2
from echelon_proto.common.v1 import common_pb2
from services.common.secagg_wire import (
    ad_from_proto,
    ad_to_proto,
    config_from_params,
    share_from_proto,
    share_to_proto,
)
from services.common.validate import RequestError

from .runtime import Contribution, WindowSpec, WindowStateError


@dataclass
class _Window:
    window: int
    party: int
    cohort_size: int
    participant: Participant | None  # None: level 2 off


class SecureAggregationSession:
    """Holds the agent's secure-aggregation state for the open window."""

    def __init__(self, boundary: str, identity: Ed25519PrivateKey) -> None:
        self.boundary = boundary
        self._identity = identity
        self._current: _Window | None = None
        self._lock = threading.Lock()
        self._rng = np.random.default_rng()

    def open(self, request: boundary_pb2.OpenWindowRequest, spec: WindowSpec) -> None:
        party = spec.parties[self.boundary]
        participant = None
        if request.secagg.levels.level2:
            identities = {}
            for member in request.cohort:
                try:
                    identities[int(member.party)] = Ed25519PublicKey.from_public_bytes(
                        member.identity_key
                    )
                except ValueError as exc:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"OpenWindowRequest.cohort[{member.boundary}].identity_key: {exc}",
                    ) from exc
            participant = Participant(
                party_id=party,
                window=spec.window,
                cohort=sorted(identities),
                identity=self._identity,
                peer_identities=identities,
                config=config_from_params(request.secagg),
                graph_seed=bytes(request.secagg.graph_seed),
            )
        with self._lock:
            self._current = _Window(spec.window, party, len(spec.parties), participant)

    def _window(self, window: int, need_secure: bool = True) -> _Window:
        with self._lock:
            current = self._current
        if current is None or current.window != window:
            want = "none open" if current is None else current.window
            raise WindowStateError(f"ref.window: got {window}, want {want}")
        if need_secure and current.participant is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"window {window}: secure aggregation level 2 is off for this run",
            )
        return current

    def _participant(self, window: int) -> Participant:
        participant = self._window(window).participant
        assert participant is not None
        return participant

    def party(self, window: int) -> int:
        return self._window(window, need_secure=False).party

    def cohort_size(self, window: int) -> int:
        return self._window(window, need_secure=False).cohort_size

    def advertise(self, window: int) -> boundary_pb2.KeyAdvertisement:
        return ad_to_proto(self._participant(window).advertise())

    def share_keys(
        self, window: int, ads: list[boundary_pb2.KeyAdvertisement]
    ) -> list[boundary_pb2.EncryptedShare]:
        parsed = {int(a.party): ad_from_proto(a, window) for a in ads}
        shares = self._participant(window).share_keys(parsed)
        return [share_to_proto(shares[r]) for r in sorted(shares)]

    def receive_shares(self, window: int, shares: list[boundary_pb2.EncryptedShare]) -> None:
        self._participant(window).receive_shares([share_from_proto(s, window) for s in shares])

    def encode(self, window: int, contribution: Contribution) -> tuple[int, np.ndarray]:
        """The vector that leaves: masked fixed point (level 2) or the plain weighted floats."""
        current = self._window(window, need_secure=False)
        if current.participant is None:
            plain = np.empty(contribution.delta.size + 1, dtype=np.float32)
            np.multiply(contribution.delta, np.float32(contribution.weight), out=plain[:-1])
            plain[-1] = contribution.weight
            return common_pb2.PAYLOAD_TYPE_PLAIN_DELTA, plain
        masked = current.participant.mask(contribution.delta, contribution.weight, self._rng)
        return common_pb2.PAYLOAD_TYPE_MASKED_DELTA, masked

    def sign_survivors(self, window: int, survivors: list[int]) -> boundary_pb2.SurvivorSignature:
        current = self._window(window)
        assert current.participant is not None
        signature = current.participant.sign_survivors(survivors)
        return boundary_pb2.SurvivorSignature(party=current.party, signature=signature)

    def unmask(
        self, window: int, survivors: list[int], signatures: list[boundary_pb2.SurvivorSignature]
    ) -> boundary_pb2.UnmaskResponse:
        current = self._window(window)
        assert current.participant is not None
        by_party = {int(s.party): bytes(s.signature) for s in signatures}
        shares: UnmaskingShares = current.participant.unmask(survivors, by_party)
        return boundary_pb2.UnmaskResponse(party=current.party, encoded=shares.to_bytes())
