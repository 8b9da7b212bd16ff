"""Conversions between the secure-aggregation library's messages and the wire protocol.

The library's messages have fixed, documented byte layouts; the proto carries them
in typed envelopes. Both the boundary agent and the coordinator use these, so the
conversion and its validation exist once.
"""

from __future__ import annotations

import grpc

from echelon.secagg import EncryptedShare, KeyAdvertisement, SecAggConfig, SecAggError
from echelon_proto.boundary.v1 import boundary_pb2

from .validate import RequestError


def config_from_params(params: boundary_pb2.SecAggParams) -> SecAggConfig:
    """The library config a window declares; INVALID_ARGUMENT when it is not valid."""
    try:
        return SecAggConfig(
            threshold_fraction=params.threshold_fraction or 0.5,
            neighbours=params.neighbours or None,
            clip=params.clip,
            frac_bits=params.frac_bits,
            max_weight=params.max_weight,
        )
    except (SecAggError, ValueError) as exc:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"OpenWindowRequest.secagg: {exc}"
        ) from exc


def _parse(kind: type, encoded: bytes, what: str) -> object:
    try:
        return kind.from_bytes(encoded)  # type: ignore[attr-defined]
    except SecAggError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}.encoded: {exc}") from exc


def ad_to_proto(ad: KeyAdvertisement) -> boundary_pb2.KeyAdvertisement:
    return boundary_pb2.KeyAdvertisement(party=ad.party, encoded=ad.to_bytes())


def ad_from_proto(message: boundary_pb2.KeyAdvertisement, window: int) -> KeyAdvertisement:
    ad = _parse(KeyAdvertisement, message.encoded, "KeyAdvertisement")
    assert isinstance(ad, KeyAdvertisement)
    if ad.party != message.party or ad.window != window:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"KeyAdvertisement: got party {ad.party} window {ad.window} inside, "
            f"want party {message.party} window {window}",
        )
    return ad


def share_to_proto(share: EncryptedShare) -> boundary_pb2.EncryptedShare:
    return boundary_pb2.EncryptedShare(
        sender=share.sender, recipient=share.recipient, encoded=share.to_bytes()
    )


def share_from_proto(message: boundary_pb2.EncryptedShare, window: int) -> EncryptedShare:
    share = _parse(EncryptedShare, message.encoded, "EncryptedShare")
    assert isinstance(share, EncryptedShare)
    if (share.sender, share.recipient, share.window) != (message.sender, message.recipient, window):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"EncryptedShare: got {share.sender}->{share.recipient} window {share.window} inside, "
            f"want {message.sender}->{message.recipient} window {window}",
        )
    return share
