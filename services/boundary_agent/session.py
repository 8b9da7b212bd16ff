"""The boundary agent's executor of the window protocol core: it dials out to the
coordinator and keeps one bidirectional window session up (keepalives, reconnection with
backoff), turns the coordinator's frames into core events, and performs the core's
commands: frames on the session, training on the devices, the delay-aware re-base. The
agent accepts no connection from outside its organization for any of this.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import structlog

from echelon.protocol import COORDINATOR, BoundaryCore
from echelon.protocol.events import (
    Command,
    DeltaSpent,
    Event,
    Note,
    Rebase,
    Received,
    Send,
    Train,
    TrainedDelta,
    TrainingFailed,
    TrainingFinished,
)
from echelon.protocol.messages import ToCoordinator
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.session_wire import CoordinatorFrameReader, FrameError, agent_frames

log = structlog.get_logger(__name__)

TrainFn = Callable[[Train], TrainedDelta]
RebaseFn = Callable[[Rebase], None]
Fault = Callable[[ToCoordinator], ToCoordinator | None]

_END = object()
#: Refusals that a retry cannot fix: the agent stops and says why.
_FATAL = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
)
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True, kw_only=True)
class Hello:
    """What the agent says of itself when it dials in (O(1), public)."""

    boundary: str
    identity_key: bytes
    devices: int
    dim: int
    layout_digest: bytes = b""
    base_model_digest: bytes = b""
    tokenizer_digest: bytes = b""


@dataclass(frozen=True, kw_only=True)
class Backoff:
    first_s: float = 0.2
    max_s: float = 10.0
    factor: float = 2.0


@dataclass
class SessionLog:
    """What happened on this agent's side (for status, metrics and tests)."""

    notes: list[Note] = field(default_factory=list)
    spent: list[DeltaSpent] = field(default_factory=list)
    sessions: int = 0
    refused: str | None = None


class AgentSession:
    """Runs one `BoundaryCore` over a dial-out window session; thread-safe."""

    def __init__(
        self,
        core: BoundaryCore,
        *,
        address: str,
        hello: Hello,
        run_id: str,
        train: TrainFn,
        rebase: RebaseFn = lambda command: None,
        fault: Fault | None = None,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.address = address
        self.hello = hello
        self.run_id = run_id
        self._train_fn = train
        self._rebase_fn = rebase
        self.fault = fault
        self.backoff = backoff
        self.clock = clock
        self.log = SessionLog()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._out: queue.Queue[object] | None = None
        self._stop = threading.Event()
        self._devices = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
        self._thread = threading.Thread(target=self._run, name="agent-session", daemon=True)
        self._call: grpc.Future | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._out is not None:
                self._out.put(_END)
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=10)
        self._devices.shutdown(wait=False, cancel_futures=True)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(timeout=left)
            return True

    # -- the core ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        with self._lock:
            self._execute(self.core.handle(event, self.clock()))
            self._changed.notify_all()

    def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Send):
                message = command.message
                if not isinstance(message, ToCoordinator):
                    continue
                if self.fault is not None:
                    faulted = self.fault(message)
                    if faulted is None:
                        continue
                    message = faulted
                out = self._out
                if out is None:
                    log.info("not_connected", dropped=type(message).__name__)
                    continue
                for frame in agent_frames(message, self.run_id):
                    out.put(frame)
            elif isinstance(command, Train):
                self._devices.submit(self._train, command)
            elif isinstance(command, Rebase):
                self._rebase_fn(command)
            elif isinstance(command, DeltaSpent):
                self.log.spent.append(command)
            elif isinstance(command, Note):
                self.log.notes.append(command)
                log.info(
                    "protocol_note", kind=command.kind, window=command.window, reason=command.reason
                )

    def _train(self, command: Train) -> None:
        try:
            result = self._train_fn(command)
        except Exception as exc:
            log.exception("training_failed", window=command.window)
            self._handle(TrainingFailed(f"{type(exc).__name__}: {exc}"))
            return
        self._handle(TrainingFinished(result))

    # -- the session -------------------------------------------------------------------------
    def _hello_frame(self) -> pb.AgentFrame:
        h = self.hello
        return pb.AgentFrame(
            context=pb.FrameContext(run_id=self.run_id),
            hello=pb.Hello(
                boundary=h.boundary,
                identity_key=h.identity_key,
                devices=h.devices,
                layout_digest=h.layout_digest,
                base_model_digest=h.base_model_digest,
                tokenizer_digest=h.tokenizer_digest,
                dim=h.dim,
                held_version=self.core.held_version,
            ),
        )

    def _run(self) -> None:
        delay = self.backoff.first_s
        while not self._stop.is_set():
            try:
                self._session()
                delay = self.backoff.first_s
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in _FATAL:
                    self.log.refused = (
                        f"{code}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
                    )
                    log.error("session_refused", reason=self.log.refused)
                    with self._changed:
                        self._changed.notify_all()
                    return
                log.info("session_lost", code=str(code))
            except FrameError as exc:
                log.warning("coordinator_protocol_violation", error=str(exc))
            if self._stop.wait(delay):
                return
            delay = min(self.backoff.max_s, delay * self.backoff.factor)

    def _session(self) -> None:
        out: queue.Queue[object] = queue.Queue()
        out.put(self._hello_frame())

        def requests() -> Iterator[pb.AgentFrame]:
            while True:
                item = out.get()
                if item is _END:
                    return
                assert isinstance(item, pb.AgentFrame)
                yield item

        with grpc.insecure_channel(self.address, options=KEEPALIVE) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            call = stub.Session(requests())
            frames = iter(call)
            with self._lock:
                self._call = call  # type: ignore[assignment]
            try:
                first = next(frames)
                if first.WhichOneof("body") != "welcome":
                    raise FrameError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"CoordinatorFrame.body: got {first.WhichOneof('body')}, want welcome",
                    )
                reader = CoordinatorFrameReader(self.core.dim)
                with self._lock:
                    self._out = out
                    self.log.sessions += 1
                    self._execute(self.core.start(self.clock()))
                    self._changed.notify_all()
                log.info("session_open", coordinator=self.address)
                for frame in frames:
                    message = reader.feed(frame)
                    if message is not None:
                        self._handle(Received(COORDINATOR, message))
            finally:
                with self._lock:
                    self._out = None
                    self._call = None
                out.put(_END)
                call.cancel()  # type: ignore[no-untyped-call]
