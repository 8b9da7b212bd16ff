"""The coordinator's executor of the window protocol core over the agents' window sessions:
each organization's agent dials in with one bidirectional stream (`Coordinator.Session`);
frames become core events, and the core's commands become frames on those streams, timers,
and durable versions. The core decides; this module performs (docs/protocol.md).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.declaration import ModelIdentity
from echelon.protocol import CoordinatorCore, WindowOutcome
from echelon.protocol.events import (
    Command,
    CommitVersion,
    Event,
    Note,
    PartyFailed,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from echelon.protocol.messages import ToBoundary
from echelon.protocol.stats import STATS
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.session_wire import AgentFrameReader, FrameError, coordinator_frames
from services.common.timers import Timers
from services.common.validate import RequestError
from services.common.wire import vector_sha256

from .store import CoordinatorStore, VersionRecord

log = structlog.get_logger(__name__)

_BOUNDARY_ID = re.compile(r"^[a-z0-9-]{1,63}$")
_CLOSE = object()


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    detail: str


class CoordinatorSessions:
    """Runs one `CoordinatorCore` for every agent session; thread-safe."""

    def __init__(
        self,
        core: CoordinatorCore,
        *,
        run_id: str,
        model: ModelIdentity | None = None,
        store: CoordinatorStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.run_id = run_id
        self.model = model
        self.store = store
        self.clock = clock
        self.outcomes: list[WindowOutcome] = []
        self.versions: list[tuple[int, bytes]] = []  # (version, SHA-256 of its adapter)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, queue.Queue[object]] = {}
        self._timers = Timers(self._timer, clock)
        self._reader_length = core.dim + len(STATS) + 1

    # -- the core ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        with self._lock:
            self._execute(self.core.handle(event, self.clock()))
            self._changed.notify_all()

    def _timer(self, key: Hashable) -> None:
        self._handle(TimerFired(key))

    def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Send):
                out = self._sessions.get(command.to)
                message = command.message
                if out is None or not isinstance(message, ToBoundary):
                    continue  # its session is gone; the core hears of it as a PartyFailed
                for frame in coordinator_frames(message, self.run_id):
                    out.put(frame)
            elif isinstance(command, SetTimer):
                self._timers.set(command.key, command.at)
            elif isinstance(command, CommitVersion):
                self._commit(command)
            elif isinstance(command, WindowOutcome):
                self.outcomes.append(command)
                log.info(
                    "window_done",
                    window=command.window,
                    committed=command.committed,
                    reason=command.reason,
                    version=command.version,
                    contributors=list(command.contributors),
                    failed=[f"{b}: {r}" for b, r in command.failed],
                )
            elif isinstance(command, Note):
                log.info(
                    "protocol_note",
                    kind=command.kind,
                    window=command.window,
                    party=command.party,
                    reason=command.reason,
                )

    def _commit(self, command: CommitVersion) -> None:
        self.versions.append((command.version, vector_sha256(command.phi)))
        if self.store is None:
            return
        record = VersionRecord(
            command.version,
            command.window,
            vector_sha256(command.phi),
            command.contributors,
            float(command.aggregate[-1]),
            int(self.clock() * 1000),
            vector_sha256(command.aggregate),
        )
        self.store.save_version(record, command.phi, command.momentum, command.aggregate)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Waits until `predicate()` holds (checked after every event); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(timeout=left)
            return True

    def stop(self) -> None:
        self._timers.stop()
        with self._lock:
            for out in self._sessions.values():
                out.put(_CLOSE)
            self._sessions.clear()

    # -- one agent's session -----------------------------------------------------------------
    def session(
        self, requests: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorFrame]:
        """The `Coordinator.Session` handler: Hello, then window frames both ways."""
        try:
            first = next(requests)
            boundary = self._hello(first)
        except StopIteration:
            return
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        out: queue.Queue[object] = queue.Queue()
        with self._lock:
            previous = self._sessions.get(boundary)
            if previous is not None:
                previous.put(_Abort(grpc.StatusCode.ABORTED, "replaced by a newer session"))
            self._sessions[boundary] = out
        log.info("session_open", boundary=boundary)
        welcome = pb.Welcome(run_id=self.run_id, current_version=max(self.core.version, 0))
        yield pb.CoordinatorFrame(welcome=welcome)
        reader = threading.Thread(
            target=self._read,
            args=(boundary, requests, out),
            name=f"session-{boundary}",
            daemon=True,
        )
        reader.start()
        while True:
            item = out.get()
            if item is _CLOSE:
                return
            if isinstance(item, _Abort):
                context.abort(item.code, item.detail)
            assert isinstance(item, pb.CoordinatorFrame)
            yield item

    def _hello(self, frame: pb.AgentFrame) -> str:
        if frame.WhichOneof("body") != "hello":
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"AgentFrame.body: got {frame.WhichOneof('body')}, want hello first",
            )
        hello = frame.hello
        if not _BOUNDARY_ID.match(hello.boundary):
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Hello.boundary: got {hello.boundary!r}, want [a-z0-9-]{{1,63}}",
            )
        if len(hello.identity_key) != 32:
            raise FrameError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Hello.identity_key: got {len(hello.identity_key)} bytes, want 32",
            )
        if hello.dim != self.core.dim:
            raise FrameError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Hello.dim: got {hello.dim}, want the run's {self.core.dim}",
            )
        if self.model is not None:
            got = ModelIdentity(
                bytes(hello.layout_digest),
                bytes(hello.base_model_digest),
                bytes(hello.tokenizer_digest),
                int(hello.dim),
            )
            if got != self.model:
                raise FrameError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Hello: model identity {got} differs from the run's {self.model}",
                )
        key = Ed25519PublicKey.from_public_bytes(bytes(hello.identity_key))
        with self._lock:
            pinned = self.core.identities.get(hello.boundary)
            if pinned is not None and pinned.public_bytes_raw() != key.public_bytes_raw():
                raise FrameError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Hello.identity_key: {hello.boundary} is bound to another identity key",
                )
            self.core.identities[hello.boundary] = key
        return str(hello.boundary)

    def _read(
        self, boundary: str, requests: Iterator[pb.AgentFrame], out: queue.Queue[object]
    ) -> None:
        reader = AgentFrameReader(self._reader_length)
        reason = "session closed"
        try:
            for frame in requests:
                message = reader.feed(frame)
                if message is not None:
                    self._handle(Received(boundary, message))
        except FrameError as exc:
            reason = f"protocol violation: {exc}"
            out.put(_Abort(exc.code, str(exc)))
        except grpc.RpcError as exc:
            reason = f"session broken: {exc}"
        with self._lock:
            if self._sessions.get(boundary) is out:
                del self._sessions[boundary]
                out.put(_CLOSE)
            else:
                return  # a newer session replaced this one
        log.info("session_closed", boundary=boundary, reason=reason)
        self._handle(PartyFailed(boundary, reason))


class SessionServicer(coordinator_pb2_grpc.CoordinatorServicer):
    """Serves `Coordinator.Session` from a `CoordinatorSessions`."""

    def __init__(self, sessions: CoordinatorSessions) -> None:
        self.sessions = sessions

    def Session(
        self, request_iterator: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorFrame]:
        return self.sessions.session(request_iterator, context)
