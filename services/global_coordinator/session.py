"""The coordinator's executor of the window protocol core over the agents' window sessions:
each organization's agent dials in with one bidirectional stream (`Coordinator.Session`);
frames become core events, and the core's commands become frames on those streams (each
recorded on the audit log before it leaves), timers, and durable versions. The core
decides; this module performs (docs/protocol.md).
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import grpc
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
from echelon.protocol.messages import Message, ToBoundary
from echelon.protocol.stats import STATS
from echelon.trust.manifest import FederationManifest, PartyRole
from echelon.trust.registration import RegistrationError, verify_registration
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.audited import AuditedPeer
from services.common.session_audit import count_bytes, record_received, record_sent
from services.common.session_wire import AgentFrameReader, FrameError, coordinator_frames
from services.common.timers import Timers
from services.common.validate import RequestError
from services.common.wire import vector_sha256

from . import metrics
from .store import CoordinatorStore, Registration, VersionRecord

log = structlog.get_logger(__name__)

_BOUNDARY_ID = re.compile(r"^[a-z0-9-]{1,63}$")
_CLOSE = object()

#: Builds the run's core once the model is pinned (by configuration or the first Hello);
#: returns the core and the canonical bytes of the run's declaration for Welcome.
CoreFactory = Callable[[ModelIdentity], tuple[CoordinatorCore, bytes]]


@dataclass(frozen=True)
class SessionsStatus:
    """O(1) status for operators: no statistic of any boundary."""

    version: int
    window: int
    inner_steps: int
    sessions: tuple[str, ...]  # agents with an open session
    known: tuple[str, ...]  # agents whose identity key is pinned
    committed: int
    aborted: int


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    detail: str


class CoordinatorSessions:
    """Runs one `CoordinatorCore` for every agent session; thread-safe."""

    def __init__(
        self,
        make_core: CoreFactory,
        *,
        run_id: str,
        model: ModelIdentity | None = None,
        store: CoordinatorStore | None = None,
        audit: AuditedPeer | None = None,
        clock: Callable[[], float] = time.time,
        manifest: FederationManifest | None = None,
    ) -> None:
        """`model` pins the run's model at start; None pins the first Hello's. `manifest`
        (mTLS): a boundary is known only by its certificate, its Hello must name itself and
        the manifest's identity key and prove possession of that key; the run's model and
        every boundary's identity key come from the manifest, never from a Hello."""
        self.make_core = make_core
        self.manifest = manifest
        self._nonces: set[bytes] = set()  # registration nonces seen (proofs are one-use)
        if manifest is not None:
            run_id = manifest.run_id
            model = manifest.declaration.model
        self.run_id = run_id
        self.model = model
        self.store = store
        self.audit = audit
        self.clock = clock
        self.outcomes: list[WindowOutcome] = []
        self.versions: list[tuple[int, bytes]] = []  # (version, SHA-256 of its adapter)
        self._core: CoordinatorCore | None = None
        self._run_config = b""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, queue.Queue[object]] = {}
        self._cohorts: dict[int, int] = {}  # window -> cohort size, of recent windows
        self._timers = Timers(self._timer, clock)
        self._stages = metrics.StageClock()
        if model is not None:
            self._pin(model)

    @property
    def core(self) -> CoordinatorCore:
        if self._core is None:
            raise RuntimeError("no agent has said hello yet: the run's model is not pinned")
        return self._core

    @property
    def pinned(self) -> bool:
        return self._core is not None

    def _pin(self, model: ModelIdentity) -> None:
        self.model = model
        self._core, self._run_config = self.make_core(model)
        if self.manifest is not None:
            for party in self.manifest.with_role(PartyRole.BOUNDARY):
                key = Ed25519PublicKey.from_public_bytes(party.identity_key)
                self._core.identities[party.party_id] = key
        elif self.store is not None:  # identities pinned before a restart stay pinned
            for boundary, reg in self.store.registrations().items():
                key = Ed25519PublicKey.from_public_bytes(reg.identity_key)
                self._core.identities.setdefault(boundary, key)
        log.info("model_pinned", dim=model.dim, version=self._core.version)

    # -- the core ----------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        with self._lock:
            now = self.clock()
            self._execute(self.core.handle(event, now))
            for win in (self.core.current, self.core.next):
                if win is not None:
                    self._stages.seen(win.id, win.rounds.stage, now)
            self._changed.notify_all()

    def _timer(self, key: Hashable) -> None:
        self._handle(TimerFired(key))

    def _cohort_size(self, window: int) -> int:
        """The cohort size of `window`, also after it closed (a late frame of a closed
        window is recorded with its window's provenance, as its sender recorded it)."""
        core = self.core
        for win in (core.current, core.next):
            if win is not None and win.id == window:
                self._cohorts[window] = len(win.cohort)
                while len(self._cohorts) > 16:
                    del self._cohorts[min(self._cohorts)]
                return len(win.cohort)
        return self._cohorts.get(window, 0)

    def _identity_key(self, boundary: str) -> bytes:
        return self.core.identities[boundary].public_bytes_raw()

    def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Send):
                self._send(command.to, command.message)
            elif isinstance(command, SetTimer):
                self._timers.set(command.key, command.at)
            elif isinstance(command, CommitVersion):
                self._commit(command)
            elif isinstance(command, WindowOutcome):
                self._outcome(command)
            elif isinstance(command, Note):
                log.info(
                    "protocol_note",
                    kind=command.kind,
                    window=command.window,
                    party=command.party,
                    reason=command.reason,
                )

    def _send(self, to: str, message: Message) -> None:
        out = self._sessions.get(to)
        if out is None or not isinstance(message, ToBoundary):
            return  # its session is gone; the core hears of it as a PartyFailed
        if self.audit is not None:
            try:
                record_sent(self.audit.gate, message, to, self._cohort_size(message.window))
            except AuditError as exc:
                log.error("egress_refused", to=to, kind=type(message).__name__, error=str(exc))
                return
        head = b"" if self.audit is None else self.audit.own_head()
        for frame in coordinator_frames(message, self.run_id, self._identity_key, head):
            out.put(frame)
        count_bytes(message, sent=True)
        metrics.FRAMES_OUT.labels(type(message).__name__).inc()

    def _outcome(self, outcome: WindowOutcome) -> None:
        self.outcomes.append(outcome)
        seconds = self.clock() - outcome.opened_s
        metrics.WINDOW_SECONDS.observe(seconds)
        metrics.WINDOWS.labels("committed" if outcome.committed else "aborted").inc()
        metrics.WINDOW.set(outcome.window)
        metrics.INNER_STEPS.set(self.core.inner_steps)
        metrics.DECLARED_WINDOWS.set(self.core.config.windows)
        metrics.COHORT.set(len(outcome.contributors) + len(outcome.failed))
        metrics.CONTRIBUTIONS.set(len(outcome.contributors))
        metrics.participation(outcome, self.core.identities)
        self._stages.ended(outcome.window, self.clock())
        if outcome.committed:
            signals = outcome.signals
            metrics.STALENESS.observe(signals.get("staleness_max", 0.0))
            metrics.MAX_STALENESS.set(signals.get("staleness_max", 0.0))
            metrics.AGREEMENT.set(signals.get("agreement", 0.0))
            metrics.TRAIN_LOSS.set(signals.get("train_loss", 0.0))
            metrics.DRIFT_RMS.set(signals.get("drift_rms", 0.0))
            metrics.MU.set(self.core.mu)
            if outcome.decision:
                metrics.H_DECISIONS.labels(outcome.decision).inc()
        log.info(
            "window_done",
            window=outcome.window,
            committed=outcome.committed,
            reason=outcome.reason,
            version=outcome.version,
            contributors=list(outcome.contributors),
            failed=[f"{b}: {r}" for b, r in outcome.failed],
            seconds=round(seconds, 3),
        )

    def _commit(self, command: CommitVersion) -> None:
        self.versions.append((command.version, vector_sha256(command.phi)))
        metrics.committed(command.version, self.clock())
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
        self.store.set_meta("window", str(command.window))

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Waits until `predicate()` holds (checked after every event); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(timeout=min(left, 3600.0))
            return True

    def stop(self) -> None:
        self._timers.stop()
        with self._lock:
            for out in self._sessions.values():
                out.put(_CLOSE)
            self._sessions.clear()
            self._changed.notify_all()

    def status(self) -> SessionsStatus:
        with self._lock:
            core = self._core
            return SessionsStatus(
                version=-1 if core is None else core.version,
                window=0 if core is None else core.window_id,
                inner_steps=0 if core is None else core.inner_steps,
                sessions=tuple(sorted(self._sessions)),
                known=() if core is None else tuple(sorted(core.identities)),
                committed=0 if core is None else core.committed,
                aborted=sum(1 for o in self.outcomes if not o.committed),
            )

    # -- one agent's session -----------------------------------------------------------------
    def session(
        self,
        requests: Iterator[pb.AgentFrame],
        context: grpc.ServicerContext,
        peer: str | None = None,
    ) -> Iterator[pb.CoordinatorFrame]:
        """The `Coordinator.Session` handler: Hello, then window frames both ways. `peer`
        is the boundary the caller's certificate proved (None on plaintext)."""
        try:
            first = next(requests)
            boundary = self._hello(first, peer)
        except StopIteration:
            return
        except RequestError as exc:
            log.warning("hello_refused", error=str(exc))
            context.abort(exc.code, str(exc))
        out: queue.Queue[object] = queue.Queue()
        with self._lock:
            previous = self._sessions.get(boundary)
            if previous is not None:
                previous.put(_Abort(grpc.StatusCode.ABORTED, "replaced by a newer session"))
            self._sessions[boundary] = out
            version = max(self.core.version, 0)
            welcome = pb.Welcome(
                run_id=self.run_id,
                current_version=version,
                run_config=self._run_config,
                run_config_sha256=hashlib.sha256(self._run_config).digest(),
            )
            if self.audit is not None:
                self.audit.gate.send(
                    PayloadType.RUN_CONFIG,
                    boundary,
                    0,
                    self._run_config,
                    RunConfig(config=self._run_config),
                    lambda: None,
                )
            metrics.SESSIONS.set(len(self._sessions))
        log.info("session_open", boundary=boundary)
        yield pb.CoordinatorFrame(context=pb.FrameContext(run_id=self.run_id), welcome=welcome)
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

    def _hello(self, frame: pb.AgentFrame, peer: str | None = None) -> str:
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
        try:
            model = ModelIdentity(
                bytes(hello.layout_digest),
                bytes(hello.base_model_digest),
                bytes(hello.tokenizer_digest),
                int(hello.dim),
            )
        except ValueError as exc:
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT, f"Hello: {exc}") from None
        key = Ed25519PublicKey.from_public_bytes(bytes(hello.identity_key))
        if self.manifest is not None:
            try:
                self._check_registration(frame, peer)
            except FrameError as exc:
                self._record_refusal(hello, peer, str(exc))
                raise
        with self._lock:
            if self._core is None:
                self._pin(model)
            if model != self.model:
                raise FrameError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Hello: model identity {model} differs from the run's {self.model}",
                )
            pinned = self.core.identities.get(hello.boundary)
            if pinned is not None and pinned.public_bytes_raw() != key.public_bytes_raw():
                detail = f"Hello.identity_key: {hello.boundary} is bound to another identity key"
                self._record_refusal(hello, peer, detail)
                raise FrameError(grpc.StatusCode.PERMISSION_DENIED, detail)
            if self.audit is not None:
                self.audit.gate.received(
                    PayloadType.KEY_REGISTRATION,
                    hello.boundary,
                    0,
                    hello.SerializeToString(deterministic=True),
                    KeyRegistration(
                        role=Role.BOUNDARY,
                        signing_key=bytes(hello.identity_key),
                        transport=TRANSPORT_INSECURE if self.manifest is None else TRANSPORT_MTLS,
                    ),
                )
            self.core.identities[hello.boundary] = key
            if self.store is not None and pinned is None:
                reg = Registration(hello.boundary, "", bytes(hello.identity_key), hello.devices)
                self.store.register(reg, int(self.clock() * 1000))
        return str(hello.boundary)

    def _record_refusal(self, hello: pb.Hello, peer: str | None, reason: str) -> None:
        """A refused registration goes on the audit log: who offered it (the certificate's
        party, or `unauthenticated`), for whom, the digest of the Hello, and why."""
        if self.audit is None:
            return
        sender = peer or "unauthenticated"
        try:
            self.audit.gate.refused_receipt(
                PayloadType.KEY_REGISTRATION,
                sender,
                0,
                hello.SerializeToString(deterministic=True),
                KeyRegistration(
                    role=Role.BOUNDARY,
                    signing_key=bytes(hello.identity_key),
                    transport=TRANSPORT_INSECURE if self.manifest is None else TRANSPORT_MTLS,
                ),
                f"registration as {hello.boundary!r} refused: {reason}",
            )
        except AuditError as exc:
            log.error("refusal_not_recorded", sender=sender, error=str(exc))

    def _check_registration(self, frame: pb.AgentFrame, peer: str | None) -> None:
        """With a manifest: the Hello names the peer's own id and the manifest's identity
        key for it, and proves possession of that key over run id, id and a fresh nonce."""
        assert self.manifest is not None
        hello = frame.hello
        if peer is None or hello.boundary != peer:
            raise FrameError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Hello.boundary: got {hello.boundary!r}, but the peer certificate is "
                f"{peer!r}'s; a boundary registers only as itself",
            )
        party = self.manifest.party(peer)
        assert party is not None, "authorize_peer resolved the peer from this manifest"
        if bytes(hello.identity_key) != party.identity_key:
            raise FrameError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Hello.identity_key: got {bytes(hello.identity_key).hex()[:16]}..., want the "
                f"manifest's identity key of {peer} ({party.identity_key.hex()[:16]}...)",
            )
        nonce = bytes(frame.context.nonce)
        if frame.context.run_id != self.run_id:
            raise FrameError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"FrameContext.run_id: got {frame.context.run_id!r}, want {self.run_id!r}",
            )
        try:
            verify_registration(
                party.identity_key, bytes(hello.proof_of_possession), self.run_id, peer, nonce
            )
        except RegistrationError as exc:
            raise FrameError(grpc.StatusCode.UNAUTHENTICATED, f"Hello.{exc}") from None
        with self._lock:
            if nonce in self._nonces:
                raise FrameError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "Hello: registration nonce already used, want a fresh proof",
                )
            if len(self._nonces) >= 65536:  # bounded: kept for this process's lifetime only
                self._nonces.clear()
            self._nonces.add(nonce)

    def _read(
        self, boundary: str, requests: Iterator[pb.AgentFrame], out: queue.Queue[object]
    ) -> None:
        reader = AgentFrameReader(self.core.dim + len(STATS) + 1)
        reason = "session closed"
        try:
            for frame in requests:
                if self.audit is not None and frame.context.witness_head:
                    self.audit.check_head(boundary, bytes(frame.context.witness_head))
                message = reader.feed(frame)
                if message is None:
                    continue
                if self.audit is not None:
                    with self._lock:
                        size = self._cohort_size(message.window)
                    record_received(self.audit.gate, message, boundary, size)
                count_bytes(message, sent=False)
                self._handle(Received(boundary, message))
        except FrameError as exc:
            reason = f"protocol violation: {exc}"
            out.put(_Abort(exc.code, str(exc)))
        except AuditError as exc:
            reason = f"refused by the egress policy: {exc}"
            out.put(_Abort(grpc.StatusCode.PERMISSION_DENIED, reason))
        except grpc.RpcError as exc:
            reason = f"session broken: {exc}"
        with self._lock:
            if self._sessions.get(boundary) is out:
                del self._sessions[boundary]
                out.put(_CLOSE)
                metrics.SESSIONS.set(len(self._sessions))
            else:
                return  # a newer session replaced this one
        log.info("session_closed", boundary=boundary, reason=reason)
        self._handle(PartyFailed(boundary, reason))


class SessionServicer(coordinator_pb2_grpc.CoordinatorServicer):  # in-process tests
    """Serves `Coordinator.Session` from a `CoordinatorSessions`."""

    def __init__(self, sessions: CoordinatorSessions) -> None:
        self.sessions = sessions

    def Session(
        self, request_iterator: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorFrame]:
        return self.sessions.session(request_iterator, context)
