"""The window session's frames: the protocol core's messages (`echelon.protocol.messages`)
to and from the protobuf frames of `session.proto`, with vectors as a header frame plus
chunks of at most 1 MiB. One codec for both ends; a frame that does not parse, or a vector
whose chunks do not add up to its header, raises `FrameError` naming what was wrong."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from echelon.protocol import messages as m
from echelon_proto.common.v1 import common_pb2
from echelon_proto.coordinator.v1 import session_pb2 as pb

from .validate import RequestError
from .wire import VectorReceiver, iter_chunks, vector_header

MAX_ITEMS = 4096  # shares or advertisements in one frame (a cohort of up to 4096)
MAX_ITEM_BYTES = 64 * 1024
MAX_TEXT = 2048


class FrameError(RequestError):
    """A frame that breaks the session protocol; the peer's failure."""


def _context(window: int, run_id: str, witness_head: bytes = b"") -> pb.FrameContext:
    """A frame's context; `witness_head` is the sender's latest verified tree head of the
    audit log, which the receiver checks against its own (a split view halts it)."""
    return pb.FrameContext(
        window=window, nonce=os.urandom(16), run_id=run_id, witness_head=witness_head
    )


def _bounded(name: str, items: list[bytes] | tuple[bytes, ...]) -> tuple[bytes, ...]:
    if len(items) > MAX_ITEMS or any(len(x) > MAX_ITEM_BYTES for x in items):
        raise FrameError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: got {len(items)} items (largest {max(map(len, items), default=0)} bytes), "
            f"want <= {MAX_ITEMS} of <= {MAX_ITEM_BYTES} bytes",
        )
    return tuple(bytes(x) for x in items)


def _text(name: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        raise FrameError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{name}: got {len(value)} chars, want <= {MAX_TEXT}"
        )
    return value


# -- coordinator -> agent ------------------------------------------------------------------------


def coordinator_frames(
    message: m.ToBoundary,
    run_id: str,
    identity_key: Callable[[str], bytes] = lambda b: b"",
    witness_head: bytes = b"",
) -> Iterator[pb.CoordinatorFrame]:
    """The frames that carry `message` to an agent; `identity_key(boundary)` fills the
    cohort's identity keys of OpenWindow and KeySetup."""
    ctx = _context(message.window, run_id, witness_head)
    if isinstance(message, m.GlobalVersion):
        header = pb.GlobalHeader(
            version=message.version,
            contributors=list(message.contributors),
            vector=vector_header(message.phi.astype(np.float32)),
        )
        yield pb.CoordinatorFrame(context=ctx, global_version=header)
        for chunk in iter_chunks(message.phi.astype(np.float32)):
            yield pb.CoordinatorFrame(context=_context(message.window, run_id), chunk=chunk)
    elif isinstance(message, m.OpenWindow):
        yield pb.CoordinatorFrame(
            context=ctx,
            open_window=pb.OpenWindow(
                version=message.version,
                cohort=list(message.cohort),
                deadline_unix_s=message.deadline_s,
                inner_steps=message.inner_steps,
                mu=message.mu,
                identity_keys=[identity_key(b) for b in message.cohort],
            ),
        )
    elif isinstance(message, m.KeySetup):
        setup = pb.KeySetup(
            cohort=list(message.cohort), identity_keys=[identity_key(b) for b in message.cohort]
        )
        yield pb.CoordinatorFrame(context=ctx, key_setup=setup)
    elif isinstance(message, m.KeysRelayed):
        body = pb.KeysRelayed(advertisements=list(message.advertisements))
        yield pb.CoordinatorFrame(context=ctx, keys_relayed=body)
    elif isinstance(message, m.SharesRelayed):
        yield pb.CoordinatorFrame(
            context=ctx, shares_relayed=pb.SharesRelayed(shares=list(message.shares))
        )
    elif isinstance(message, m.SurvivorsAnnounced):
        body_s = pb.SurvivorsAnnounced(survivors=list(message.survivors))
        yield pb.CoordinatorFrame(context=ctx, survivors_announced=body_s)
    elif isinstance(message, m.UnmaskRequested):
        body_u = pb.UnmaskRequested(
            survivors=list(message.survivors),
            signatures=[pb.PartySignature(party=p, signature=s) for p, s in message.signatures],
        )
        yield pb.CoordinatorFrame(context=ctx, unmask_requested=body_u)
    else:
        yield pb.CoordinatorFrame(
            context=ctx, window_aborted=pb.WindowAborted(reason=message.reason)
        )


# -- agent -> coordinator ------------------------------------------------------------------------


def agent_frames(
    message: m.ToCoordinator, run_id: str, witness_head: bytes = b""
) -> Iterator[pb.AgentFrame]:
    """The frames that carry `message` to the coordinator."""
    ctx = _context(message.window, run_id, witness_head)
    if isinstance(message, m.ContributionSent):
        header = pb.ContributionHeader(
            base_version=message.base_version,
            devices=message.devices,
            vector=vector_header(message.vector),
        )
        yield pb.AgentFrame(context=ctx, contribution=header)
        for chunk in iter_chunks(message.vector):
            yield pb.AgentFrame(context=_context(message.window, run_id), chunk=chunk)
    elif isinstance(message, m.Joined):
        yield pb.AgentFrame(context=ctx, joined=pb.Joined(held_version=message.held_version))
    elif isinstance(message, m.KeysAdvertised):
        body = pb.KeysAdvertised(advertisement=message.advertisement)
        yield pb.AgentFrame(context=ctx, keys_advertised=body)
    elif isinstance(message, m.SharesSent):
        yield pb.AgentFrame(context=ctx, shares_sent=pb.SharesSent(shares=list(message.shares)))
    elif isinstance(message, m.SurvivorsSigned):
        body_s = pb.SurvivorsSigned(signature=message.signature)
        yield pb.AgentFrame(context=ctx, survivors_signed=body_s)
    elif isinstance(message, m.SharesReleased):
        yield pb.AgentFrame(context=ctx, shares_released=pb.SharesReleased(shares=message.shares))
    else:
        yield pb.AgentFrame(context=ctx, declined=pb.Declined(reason=message.reason))


F = TypeVar("F", pb.AgentFrame, pb.CoordinatorFrame)


class _Assembler:
    """Collects a vector's chunk frames after its header frame."""

    def __init__(self) -> None:
        self._receiver: VectorReceiver | None = None
        self._pending: object = None
        self._window = 0
        self._what = ""

    def start(
        self,
        header: common_pb2.VectorHeader,
        what: str,
        window: int,
        pending: object,
        want_length: int | None,
    ) -> None:
        try:
            self._receiver = VectorReceiver(header, what, want_length)
        except FrameError:
            raise
        except RequestError as exc:  # the peer's failure too: it ends the session
            raise FrameError(exc.code, str(exc)) from None
        self._pending = pending
        self._window = window
        self._what = what

    @property
    def busy(self) -> bool:
        return self._receiver is not None

    def chunk(
        self, window: int, chunk: common_pb2.VectorChunk, header_kind: str
    ) -> tuple[object, np.ndarray] | None:
        receiver = self._receiver
        if receiver is None:
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a chunk frame without a header, want a {header_kind} frame before its chunks",
            )
        if window != self._window:
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self._what}: chunk frame of window {window} inside a vector of window "
                f"{self._window}, want every chunk of window {self._window}",
            )
        try:
            receiver.add(chunk)
            if receiver.filled < receiver.total:
                return None
            self._receiver = None
            return self._pending, receiver.finish()
        except FrameError:
            raise
        except RequestError as exc:  # a bad offset or size, a digest mismatch: DATA_LOSS
            raise FrameError(exc.code, str(exc)) from None

    def inside(self, kind: str | None) -> FrameError:
        """The error for a `kind` frame that arrived between a vector's header and its end."""
        receiver = self._receiver
        left = 0 if receiver is None else receiver.total - receiver.filled
        return FrameError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a {kind} frame inside a vector ({self._what}), want its chunks first "
            f"({left} bytes left)",
        )


class CoordinatorFrameReader:
    """The agent's reader of coordinator frames; `feed` returns a whole message or None."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vector = _Assembler()
        self.cohort_keys: dict[str, bytes] = {}  # of the last OpenWindow or KeySetup

    def _keys(self, what: str, cohort: list[str], keys: list[bytes]) -> None:
        if len(keys) != len(cohort) or any(len(k) != 32 for k in keys):
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}.identity_keys: got {len(keys)} keys for {len(cohort)} members, want "
                "one 32-byte key per member",
            )
        self.cohort_keys = dict(zip(cohort, (bytes(k) for k in keys), strict=True))

    def feed(self, frame: pb.CoordinatorFrame) -> m.ToBoundary | None:
        w = frame.context.window
        kind = frame.WhichOneof("body")
        if self._vector.busy and kind != "chunk":
            raise self._vector.inside(kind)
        if kind == "chunk":
            done = self._vector.chunk(w, frame.chunk, "global_version")
            if done is None:
                return None
            head, phi = done
            assert isinstance(head, pb.GlobalHeader)
            return m.GlobalVersion(
                window=w,
                version=head.version,
                phi=phi.astype(np.float32),
                contributors=tuple(head.contributors),
            )
        if kind == "global_version":
            head = frame.global_version
            self._vector.start(head.vector, "GlobalHeader.vector", w, head, self.dim)
            return None
        if kind == "open_window":
            o = frame.open_window
            self._keys("OpenWindow", list(o.cohort), list(o.identity_keys))
            return m.OpenWindow(
                window=w,
                version=o.version,
                cohort=tuple(o.cohort),
                deadline_s=o.deadline_unix_s,
                inner_steps=o.inner_steps,
                mu=o.mu,
            )
        if kind == "key_setup":
            k = frame.key_setup
            self._keys("KeySetup", list(k.cohort), list(k.identity_keys))
            return m.KeySetup(window=w, cohort=tuple(k.cohort))
        if kind == "keys_relayed":
            ads = _bounded("KeysRelayed.advertisements", list(frame.keys_relayed.advertisements))
            return m.KeysRelayed(window=w, advertisements=ads)
        if kind == "shares_relayed":
            shares = _bounded("SharesRelayed.shares", list(frame.shares_relayed.shares))
            return m.SharesRelayed(window=w, shares=shares)
        if kind == "survivors_announced":
            return m.SurvivorsAnnounced(
                window=w, survivors=tuple(frame.survivors_announced.survivors)
            )
        if kind == "unmask_requested":
            u = frame.unmask_requested
            sigs = _bounded("UnmaskRequested.signatures", [s.signature for s in u.signatures])
            return m.UnmaskRequested(
                window=w,
                survivors=tuple(u.survivors),
                signatures=tuple((s.party, sig) for s, sig in zip(u.signatures, sigs, strict=True)),
            )
        if kind == "window_aborted":
            return m.WindowAborted(window=w, reason=_text("reason", frame.window_aborted.reason))
        raise FrameError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"CoordinatorFrame.body: got {kind}, want a window frame",
        )


class AgentFrameReader:
    """The coordinator's reader of one agent's frames (after its Hello)."""

    def __init__(self, length: int) -> None:
        """`length` is a contribution vector's length (adapter + statistics + weight)."""
        self.length = length
        self._vector = _Assembler()

    def feed(self, frame: pb.AgentFrame) -> m.ToCoordinator | None:
        w = frame.context.window
        kind = frame.WhichOneof("body")
        if self._vector.busy and kind != "chunk":
            raise self._vector.inside(kind)
        if kind == "chunk":
            done = self._vector.chunk(w, frame.chunk, "contribution")
            if done is None:
                return None
            head, vector = done
            assert isinstance(head, pb.ContributionHeader)
            return m.ContributionSent(
                window=w, base_version=head.base_version, devices=head.devices, vector=vector
            )
        if kind == "contribution":
            head = frame.contribution
            self._vector.start(head.vector, "ContributionHeader.vector", w, head, self.length)
            return None
        if kind == "joined":
            return m.Joined(window=w, held_version=frame.joined.held_version)
        if kind == "keys_advertised":
            (ad,) = _bounded("KeysAdvertised.advertisement", [frame.keys_advertised.advertisement])
            return m.KeysAdvertised(window=w, advertisement=ad)
        if kind == "shares_sent":
            shares = _bounded("SharesSent.shares", list(frame.shares_sent.shares))
            return m.SharesSent(window=w, shares=shares)
        if kind == "survivors_signed":
            (sig,) = _bounded("SurvivorsSigned.signature", [frame.survivors_signed.signature])
            return m.SurvivorsSigned(window=w, signature=sig)
        if kind == "shares_released":
            (shares_b,) = _bounded("SharesReleased.shares", [frame.shares_released.shares])
            return m.SharesReleased(window=w, shares=shares_b)
        if kind == "declined":
            return m.Declined(window=w, reason=_text("reason", frame.declined.reason))
        raise FrameError(
            grpc.StatusCode.INVALID_ARGUMENT, f"AgentFrame.body: got {kind}, want a window frame"
        )
