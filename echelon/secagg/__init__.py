"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ neighbour graphs), free of any transport.

One ``Aggregator`` and one ``Participant`` per party run a window: signed key
advertisements, encrypted Shamir shares of each party's keys, masked
fixed-point vectors summed in O(d) memory, a signed survivor list, and
unmasking. The same classes serve both levels of Echelon: devices with their
boundary agent as aggregator, and boundary agents with the coordinator.
"""

from echelon.secagg.aggregator import AggregateResult, Aggregator, AggregatorStage, LateSubmission
from echelon.secagg.codec import decode, encode
from echelon.secagg.config import SecAggConfig
from echelon.secagg.errors import (
    AbortedRound,
    ConfigError,
    ConsistencyError,
    DuplicateSubmission,
    InsufficientSignatures,
    InvalidContribution,
    InvalidSignature,
    LengthMismatch,
    MalformedMessage,
    SecAggError,
    ShareAuthenticationError,
    ShareReconstructionError,
    StageError,
    UnexpectedShare,
    UnknownParty,
    WrongWindow,
)
from echelon.secagg.graph import NeighbourGraph, graph_degree
from echelon.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    MessageType,
    UnmaskingShares,
    session_context,
    survivor_list_bytes,
)
from echelon.secagg.participant import Participant, ParticipantStage
from echelon.secagg.prg import MaskGenerator

__all__ = [
    "AbortedRound",
    "AggregateResult",
    "Aggregator",
    "AggregatorStage",
    "ConfigError",
    "ConsistencyError",
    "DuplicateSubmission",
    "EncryptedShare",
    "InsufficientSignatures",
    "InvalidContribution",
    "InvalidSignature",
    "KeyAdvertisement",
    "LateSubmission",
    "LengthMismatch",
    "MalformedMessage",
    "MaskGenerator",
    "MessageType",
    "NeighbourGraph",
    "Participant",
    "ParticipantStage",
    "SecAggConfig",
    "SecAggError",
    "ShareAuthenticationError",
    "ShareReconstructionError",
    "StageError",
    "UnexpectedShare",
    "UnknownParty",
    "UnmaskingShares",
    "WrongWindow",
    "decode",
    "encode",
    "graph_degree",
    "session_context",
    "survivor_list_bytes",
]
