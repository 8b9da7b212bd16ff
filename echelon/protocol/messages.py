"""The window protocol's messages: a closed set of typed values that cross between a
boundary and the coordinator, whatever carries them (an in-process queue in the simulator,
gRPC in the services).

Every message names its window. Secure-aggregation payloads travel as the library's
fixed-layout bytes, so that a core parses (and refuses) what a hostile party sent; vectors
travel as numpy arrays that the executor has already length- and digest-checked. No message
can carry a device's state: the only vector a boundary sends is its masked (or, with level 2
off, plain weighted) boundary contribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# -- coordinator -> boundary -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OpenWindow:
    """Window `window` works on global `version`; `cohort` is sorted, party = index."""

    window: int
    version: int
    cohort: tuple[str, ...]
    deadline_s: float
    inner_steps: int
    mu: float


@dataclass(frozen=True, kw_only=True)
class KeySetup:
    """Pre-keying: window `window`'s key rounds start while the window before it unmasks;
    the boundary answers with its advertisement. `OpenWindow` follows with the version."""

    window: int
    cohort: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class GlobalVersion:
    """Global adapter `version` (offset from the shared initial adapter) and who is in it."""

    window: int
    version: int
    phi: np.ndarray
    contributors: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class KeysRelayed:
    """Every advertisement of the window's key round, relayed to each advertiser."""

    window: int
    advertisements: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class SharesRelayed:
    """The encrypted shares addressed to this party."""

    window: int
    shares: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class SurvivorsAnnounced:
    """The survivor list (party ids) every survivor must sign before any unmasking."""

    window: int
    survivors: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class UnmaskRequested:
    """The signed survivor list; survivors answer with their unmasking shares."""

    window: int
    survivors: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, kw_only=True)
class WindowAborted:
    """The window ended without a result; deltas not yet spent stay in their boundary."""

    window: int
    reason: str


# -- boundary -> coordinator -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Joined:
    """A boundary is ready (its devices can train) and holds global `held_version`."""

    window: int
    held_version: int


@dataclass(frozen=True, kw_only=True)
class KeysAdvertised:
    """The party's signed per-window key advertisement (`KeyAdvertisement` bytes)."""

    window: int
    advertisement: bytes


@dataclass(frozen=True, kw_only=True)
class SharesSent:
    """The party's Shamir shares, encrypted per recipient (`EncryptedShare` bytes)."""

    window: int
    shares: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class ContributionSent:
    """A boundary's contribution: the masked uint32 vector (level 2) or the plain float
    vector `[w x, w]` (baseline), with O(1) metadata that is not a statistic of its data:
    the base version (staleness) and the device count as the sender's signed statement."""

    window: int
    base_version: int
    devices: int
    vector: np.ndarray


@dataclass(frozen=True, kw_only=True)
class SurvivorsSigned:
    window: int
    signature: bytes


@dataclass(frozen=True, kw_only=True)
class SharesReleased:
    """The party's `UnmaskingShares` bytes."""

    window: int
    shares: bytes


@dataclass(frozen=True, kw_only=True)
class Declined:
    """The boundary will not take part in this window (a policy refusal, a protocol
    violation it detected, no delta ready); `reason` says which."""

    window: int
    reason: str


ToBoundary = (
    OpenWindow
    | KeySetup
    | GlobalVersion
    | KeysRelayed
    | SharesRelayed
    | SurvivorsAnnounced
    | UnmaskRequested
    | WindowAborted
)
ToCoordinator = (
    Joined
    | KeysAdvertised
    | SharesSent
    | ContributionSent
    | SurvivorsSigned
    | SharesReleased
    | Declined
)
Message = ToBoundary | ToCoordinator
