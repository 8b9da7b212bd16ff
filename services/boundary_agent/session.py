"""The boundary agent's executor of the window protocol core: it dials out to the
coordinator and keeps one bidirectional window session up (keepalives, reconnection with
backoff), turns the coordinator's frames into core events, and performs the core's
commands: frames on the session, training on the devices, the delay-aware re-base. The
agent accepts no connection from outside its organization for any of this.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpc
import numpy as np
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.audit.errors import AuditError
from echelon.audit.record import (
    TRANSPORT_INSECURE,
    TRANSPORT_MTLS,
    KeyRegistration,
    PayloadType,
    Role,
    RunConfig,
)
from echelon.protocol import COORDINATOR, BoundaryCore
from echelon.protocol.boundary import BoundaryState
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
from echelon.protocol.messages import KeySetup, OpenWindow, ToCoordinator
from echelon.trust.manifest import PartyRole
from echelon.trust.registration import NONCE_BYTES, prove_registration
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.audited import AuditedPeer
from services.common.session_audit import count_bytes, record_received, record_sent
from services.common.session_wire import CoordinatorFrameReader, FrameError, agent_frames
from services.common.transport import Transport

log = structlog.get_logger(__name__)

TrainFn = Callable[[Train], TrainedDelta]
RebaseFn = Callable[[Rebase], None]
Fault = Callable[[ToCoordinator], ToCoordinator | None]

_END = object()


class SessionTrust(TypedDict):
    """`AgentSession`'s transport arguments (passed as `**trust`, checked by type)."""

    dial: Callable[[str, list[tuple[str, Any]]], grpc.Channel]
    prove: Callable[[str, bytes], bytes] | None
    manifest_keys: dict[str, bytes] | None


def session_trust(transport: Transport, boundary: str) -> SessionTrust:
    """`AgentSession`'s transport arguments for the party `boundary`: `dial` (mTLS with a
    kit, plaintext without), and with a kit `prove` (its registration proof, signed by the
    kit's identity key) and `manifest_keys` (the manifest's boundaries' identity keys)."""
    kit = transport.kit

    def dial(target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        return transport.dial(target, PartyRole.COORDINATOR, options)

    if kit is None:
        return {"dial": dial, "prove": None, "manifest_keys": None}
    return {
        "dial": dial,
        "prove": lambda run_id, nonce: prove_registration(
            kit.identity_key, run_id, boundary, nonce
        ),
        "manifest_keys": {
            p.party_id: p.identity_key for p in kit.manifest.with_role(PartyRole.BOUNDARY)
        },
    }


class RunRefused(Exception):
    """The run the coordinator declared is not one this organization joins (another
    model, or below its floor): the agent stops and says why; a retry cannot fix it."""


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


@dataclass(frozen=True)
class AgentStatus:
    """The agent's O(1) status for its own operators."""

    connected: bool
    held_version: int
    window: int
    pending: int
    pending_base: int
    lost: int
    dropped: int


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
        make_core: Callable[[pb.Welcome], BoundaryCore],
        *,
        address: str,
        hello: Hello,
        run_id: str,
        train: TrainFn,
        rebase: RebaseFn = lambda command: None,
        fault: Fault | None = None,
        backoff: Backoff = Backoff(),
        audit: AuditedPeer | None = None,
        persist: Callable[[BoundaryState], None] | None = None,
        ready: bool = True,
        clock: Callable[[], float] = time.time,
        dial: Callable[[str, list[tuple[str, Any]]], grpc.Channel] | None = None,
        prove: Callable[[str, bytes], bytes] | None = None,
        manifest_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        """`make_core(welcome)` builds the core from the run the coordinator declared (once;
        a later session must declare the same run). With `ready` False the agent joins no
        window until `mark_ready()` (its devices are up). With a manifest (mTLS): `dial`
        opens the authenticated channel to the coordinator, `prove(run_id, nonce)` signs
        the Hello's registration proof, and `manifest_keys` are the only identity keys a
        window may name (no key is learnt from the coordinator)."""
        self.make_core = make_core
        self._dial = dial or (lambda target, options: grpc.insecure_channel(target, options))
        self._prove = prove
        self.manifest_keys = manifest_keys
        self.persist = persist
        self._persisted: tuple[object, ...] = ()
        self.core: BoundaryCore | None = None
        self.run_config_sha256 = b""
        self.audit = audit
        self._ready = ready
        self._joined = False
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
        self._training: Future[None] | None = None
        self._thread = threading.Thread(target=self._run, name="agent-session", daemon=True)
        self._call: grpc.Future | None = None  # type: ignore[type-arg]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._changed.notify_all()  # waiters re-check their predicates (and the stop)
            if self._out is not None:
                self._out.put(_END)
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=10)
        self._devices.shutdown(wait=False, cancel_futures=True)

    def drain(self, timeout_s: float) -> bool:
        """After `stop` (and closing the devices, which makes a run in progress fail out):
        waits until no training run is left in this process; False on timeout."""
        training = self._training
        if training is None:
            return True
        done, _ = wait_futures([training], timeout=timeout_s)
        return bool(done)

    def held_global(self) -> tuple[int, np.ndarray] | None:
        """The global version this boundary holds and its adapter offset phi (None before
        the first)."""
        with self._lock:
            core = self.core
            if core is None or core.held_version < 0:
                return None
            return core.held_version, core.phi.copy()

    def changed(self) -> None:
        """Wakes every `wait` to re-check its predicate (a condition outside the session
        changed, e.g. the devices failed to start)."""
        with self._changed:
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(timeout=min(left, 3600.0))
            return True

    # -- the core ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        with self._lock:
            assert self.core is not None
            self._execute(self.core.handle(event, self.clock()))
            self._save_if_changed()
            self._changed.notify_all()

    def _save_if_changed(self, force: bool = False) -> None:
        """Persists the core's state when what a restart needs has changed."""
        core = self.core
        if self.persist is None or core is None:
            return
        mark = (
            core.held_version,
            tuple(id(d) for d in core.pending),
            core.submitted is not None,
            core.last_window,
            core.lost,
            core.dropped,
        )
        if force or mark != self._persisted:
            self.persist(core.state())
            self._persisted = mark

    def _cohort_size(self, window: int) -> int:
        core = self.core
        if core is None:
            return 0
        if core.window is not None and core.window.window == window:
            return len(core.window.cohort)
        if core.next_rounds is not None and core.next_rounds.window == window:
            return len(core._next_cohort)
        return 0

    def status(self) -> AgentStatus:
        with self._lock:
            core = self.core
            if core is None:
                return AgentStatus(
                    connected=self._out is not None,
                    held_version=-1,
                    window=0,
                    pending=0,
                    pending_base=-1,
                    lost=0,
                    dropped=0,
                )
            return AgentStatus(
                connected=self._out is not None,
                held_version=core.held_version,
                window=core.last_window,
                pending=len(core.pending),
                pending_base=core.pending[0].base_version if core.pending else -1,
                lost=core.lost,
                dropped=core.dropped,
            )

    def mark_ready(self) -> None:
        """The devices are up: join the next window (now, or once a session is open)."""
        with self._lock:
            self._ready = True
            self._maybe_join()

    def _maybe_join(self) -> None:
        if self._ready and not self._joined and self._out is not None and self.core is not None:
            self._joined = True
            self._execute(self.core.start(self.clock()))
            self._changed.notify_all()

    def _pin(self, keys: dict[str, bytes]) -> None:
        """Pins each cohort member's identity key the first time it is named; with a
        manifest, a member it does not name, or another key, ends the session."""
        core = self.core
        assert core is not None
        if self.manifest_keys is not None:
            for boundary, raw in keys.items():
                if self.manifest_keys.get(boundary) != raw:
                    log.error("identity_key_not_in_manifest", party=boundary)
                    raise FrameError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"OpenWindow.identity_keys: {boundary}'s key {raw.hex()[:16]}... is "
                        "not the manifest's (or it is no party of it); the window is refused",
                    )
            return
        for boundary, raw in keys.items():
            known = core.identities.get(boundary)
            if known is None:
                core.identities[boundary] = Ed25519PublicKey.from_public_bytes(raw)
            elif known.public_bytes_raw() != raw:
                log.warning("identity_key_mismatch", party=boundary)

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
                if self.audit is not None:
                    try:
                        record_sent(
                            self.audit.gate, message, COORDINATOR, self._cohort_size(message.window)
                        )
                        self.audit.before_egress()
                    except AuditError as exc:
                        log.error("egress_refused", kind=type(message).__name__, error=str(exc))
                        if self.audit.halted is not None:
                            out.put(_END)  # a halted party ends its session; _run stops
                        continue
                head = b"" if self.audit is None else self.audit.own_head()
                for frame in agent_frames(message, self.run_id, head):
                    out.put(frame)
                count_bytes(message, sent=True)
            elif isinstance(command, Train):
                self._training = self._devices.submit(self._train, command)
            elif isinstance(command, Rebase):
                self._rebase_fn(command)
            elif isinstance(command, DeltaSpent):
                self.log.spent.append(command)
                self._save_if_changed(force=True)  # durable before the signature leaves
            elif isinstance(command, Note):
                self.log.notes.append(command)
                if command.kind == "dropped" and self.audit is not None:
                    self.audit.dropped(command.window, command.staleness)
                log.info(
                    "protocol_note", kind=command.kind, window=command.window, reason=command.reason
                )

    def _train(self, command: Train) -> None:
        started = time.monotonic()
        try:
            result = self._train_fn(command)
        except Exception as exc:
            if self._stop.is_set():  # the agent is stopping: the devices were closed under it
                log.info("training_stopped", window=command.window, reason=str(exc))
                return
            log.exception("training_failed", window=command.window)
            self._handle(TrainingFailed(f"{type(exc).__name__}: {exc}"))
            return
        core = self.core
        log.info(
            "delta_ready",
            window=command.window if core is None else core.last_window,
            base=result.base_version,
            tokens=result.tokens,
            train_loss=round(result.train_loss, 4),
            train_s=round(time.monotonic() - started, 3),
            fresh=command.fresh,
        )
        self._handle(TrainingFinished(result))

    # -- the session -------------------------------------------------------------------------
    def _hello_frame(self) -> pb.AgentFrame:
        h = self.hello
        nonce = secrets.token_bytes(NONCE_BYTES)
        proof = b"" if self._prove is None else self._prove(self.run_id, nonce)
        return pb.AgentFrame(
            context=pb.FrameContext(run_id=self.run_id, nonce=nonce),
            hello=pb.Hello(
                proof_of_possession=proof,
                boundary=h.boundary,
                identity_key=h.identity_key,
                devices=h.devices,
                layout_digest=h.layout_digest,
                base_model_digest=h.base_model_digest,
                tokenizer_digest=h.tokenizer_digest,
                dim=h.dim,
                held_version=-1 if self.core is None else self.core.held_version,
            ),
        )

    def _welcome(self, welcome: pb.Welcome) -> BoundaryCore:
        """The run the coordinator declared; the core is built once, for that run."""
        digest = bytes(welcome.run_config_sha256)
        if hashlib.sha256(welcome.run_config).digest() != digest:
            raise FrameError(
                grpc.StatusCode.DATA_LOSS, "Welcome.run_config does not match its SHA-256"
            )
        with self._lock:
            if self.core is not None and digest != self.run_config_sha256:
                raise FrameError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "Welcome: the coordinator declares another run than the one this agent "
                    "joined; restart the agent for a new run",
                )
            if self.audit is not None:  # every Welcome's copy, as the coordinator records it
                body = bytes(welcome.run_config)
                self.audit.gate.received(
                    PayloadType.RUN_CONFIG, COORDINATOR, 0, body, RunConfig(config=body)
                )
            if self.core is None:
                try:
                    core = self.make_core(welcome)
                except ValueError as exc:  # another model or run, or below this org's floor
                    self._record_refusal(bytes(welcome.run_config), f"run refused: {exc}")
                    raise RunRefused(str(exc)) from exc
                self.run_id = self.run_id or welcome.run_id
                self.core = core
                self.run_config_sha256 = digest
            return self.core

    def _record_refusal(self, body: bytes, reason: str) -> None:
        """The refused run's declaration and the reason, on the audit log before the
        agent stops (a pipelined append is flushed first)."""
        if self.audit is None:
            return
        try:
            self.audit.gate.refused_receipt(
                PayloadType.RUN_CONFIG, COORDINATOR, 0, body, RunConfig(config=body), reason
            )
            if self.audit.pipeline is not None:  # on the log before the agent stops
                self.audit.pipeline.flush(10.0)
        except AuditError as exc:
            log.error("refusal_not_recorded", reason=reason, error=str(exc))

    def _run(self) -> None:
        delay = self.backoff.first_s
        while not self._stop.is_set():
            opened = self.log.sessions  # only this thread counts sessions
            try:
                self._session()
                delay = self.backoff.first_s
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                # A refused Hello is fatal; a refusal after Welcome ends that session only
                # (one bad frame fails this agent in one window, as in the protocol core).
                if code in _FATAL and self.log.sessions == opened:
                    self.log.refused = (
                        f"{code}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
                    )
                    log.error("session_refused", reason=self.log.refused)
                    with self._changed:
                        self._changed.notify_all()
                    return
                log.info("session_lost", code=str(code))
            except RunRefused as exc:  # the run this agent was offered: it will not join
                self.log.refused = f"run refused: {exc}"
                log.error("run_refused", reason=str(exc))
                with self._changed:
                    self._changed.notify_all()
                return
            except FrameError as exc:
                log.warning("coordinator_protocol_violation", error=str(exc))
            except AuditError as exc:
                if self.audit is not None and self.audit.halted is not None:
                    # the party stopped all egress (its log failed): it stays stopped
                    self.log.refused = f"egress halted: {self.audit.halted}"
                    log.error("session_halted", reason=self.log.refused)
                    with self._changed:
                        self._changed.notify_all()
                    return
                log.warning("session_record_refused", error=str(exc))
            if self._stop.wait(delay):
                return
            delay = min(self.backoff.max_s, delay * self.backoff.factor)

    def _session(self) -> None:
        out: queue.Queue[object] = queue.Queue()
        hello = self._hello_frame()
        if self.audit is not None:
            self.audit.gate.send(
                PayloadType.KEY_REGISTRATION,
                COORDINATOR,
                0,
                hello.hello.SerializeToString(deterministic=True),
                KeyRegistration(
                    role=Role.BOUNDARY,
                    signing_key=self.hello.identity_key,
                    transport=TRANSPORT_INSECURE if self._prove is None else TRANSPORT_MTLS,
                ),
                lambda: None,
            )
            self.audit.before_egress()
        out.put(hello)

        def requests() -> Iterator[pb.AgentFrame]:
            while True:
                item = out.get()
                if item is _END:
                    return
                assert isinstance(item, pb.AgentFrame)
                yield item

        with self._dial(self.address, KEEPALIVE) as channel:
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
                core = self._welcome(first.welcome)
                reader = CoordinatorFrameReader(core.dim)
                with self._lock:
                    self._out = out
                    self._joined = False
                    self.log.sessions += 1
                    self._maybe_join()
                    self._changed.notify_all()
                log.info("session_open", coordinator=self.address)
                for frame in frames:
                    if self.audit is not None and frame.context.witness_head:
                        self.audit.check_head(COORDINATOR, bytes(frame.context.witness_head))
                    message = reader.feed(frame)
                    if message is None:
                        continue
                    with self._lock:
                        if isinstance(message, (OpenWindow, KeySetup)):
                            self._pin(reader.cohort_keys)
                        if self.audit is not None:
                            size = (
                                len(message.cohort)
                                if isinstance(message, (OpenWindow, KeySetup))
                                else self._cohort_size(message.window)
                            )
                            record_received(self.audit.gate, message, COORDINATOR, size)
                    count_bytes(message, sent=False)
                    self._handle(Received(COORDINATOR, message))
            finally:
                with self._lock:
                    self._out = None
                    self._call = None
                out.put(_END)
                call.cancel()  # type: ignore[no-untyped-call]
