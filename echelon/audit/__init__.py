"""The audit surface's transport-free library: records, egress gate, Merkle log, verifier.

The audit log service (`services/audit_log`) wraps `TransparencyLog`; the boundary
agent and the coordinator send every cross-boundary payload through an `EgressGate`.
"""

from .checkpoint import LogSigner, NoteVerifier, SignedTreeHead, TreeHead
from .errors import (
    AppendRefused,
    AuditError,
    CheckpointError,
    ConfigError,
    CounterReplay,
    ForkError,
    KeyConflict,
    LogRangeError,
    PolicyViolation,
    ProofError,
    RecordError,
    RollbackError,
    RootMismatchError,
    SignatureError,
    StoreCorrupted,
    UnknownSigner,
    VerificationError,
)
from .gate import AuditSink, EgressGate, wall_clock_ms
from .log import AppendResult, LocalSink, TransparencyLog
from .policy import PayloadAllowList, Policy
from .record import (
    LOG_PARTY,
    AuditRecord,
    DeltaAttributes,
    Direction,
    DroppedAttributes,
    KeyRegistration,
    MetadataAttributes,
    NoAttributes,
    PayloadType,
    Role,
    RunConfig,
    SecAggLevels,
    Verdict,
)
from .signing import Signer, verify_signature
from .store import LogEntry, LogStore, MemoryLogStore, SqliteLogStore, StoredEntry
from .witness import ConsistencySource, Witness

__all__ = [
    "LOG_PARTY",
    "AppendRefused",
    "AppendResult",
    "AuditError",
    "AuditRecord",
    "AuditSink",
    "CheckpointError",
    "ConfigError",
    "ConsistencySource",
    "CounterReplay",
    "DeltaAttributes",
    "Direction",
    "DroppedAttributes",
    "EgressGate",
    "ForkError",
    "KeyConflict",
    "KeyRegistration",
    "LocalSink",
    "LogEntry",
    "LogRangeError",
    "LogSigner",
    "LogStore",
    "MemoryLogStore",
    "MetadataAttributes",
    "NoAttributes",
    "NoteVerifier",
    "PayloadAllowList",
    "PayloadType",
    "Policy",
    "PolicyViolation",
    "ProofError",
    "RecordError",
    "Role",
    "RollbackError",
    "RootMismatchError",
    "RunConfig",
    "SecAggLevels",
    "SignatureError",
    "SignedTreeHead",
    "Signer",
    "SqliteLogStore",
    "StoreCorrupted",
    "StoredEntry",
    "TransparencyLog",
    "TreeHead",
    "UnknownSigner",
    "Verdict",
    "VerificationError",
    "Witness",
    "verify_signature",
    "wall_clock_ms",
]
