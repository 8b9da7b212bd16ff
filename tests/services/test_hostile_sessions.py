"""Hostile parties over the real window sessions (agents dialing out to the coordinator over
gRPC, tests/services/sessions.py): for each message a boundary sends, a party that sends
bytes that fail to parse, a bad signature, a vector of the wrong length or dtype, a message
for another window, or nothing at all fails alone: the window commits without it (or with
its masked vector, when that was in before it misbehaved), the version equals the honest
survivors' weighted average, and the coordinator goes on to the next window.

Two levels: the agents' core messages rewritten before framing (the same matrix as
tests/protocol/test_cores.py, which the simulator's executor must agree with), and a raw
hostile gRPC client that speaks the session's frames itself and breaks them (a vector whose
chunks do not match its SHA-256, a chunk without a header, a frame of another window, a
frame with no body, a malformed Hello, a Hello for an id bound to another key). The
stage and deadline timers are short, so that silence costs about a second."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.protocol import COORDINATOR
from echelon.protocol.messages import ContributionSent, SharesSent, ToCoordinator
from echelon.protocol.stats import STATS
from echelon_proto.common.v1 import common_pb2
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.wire import iter_chunks, vector_header, vector_sha256
from tests.protocol.harness import (
    DIM,
    HOSTILE,
    HOSTILE_IDS,
    TOL,
    corrupt,
    expected_phi,
    protocol_config,
)
from tests.services.sessions import BASE, LAYOUT, TOKENIZER, Sites, start_sites
from tests.services.test_parity import Scenario, simulated

HONEST = ("org-a", "org-b", "org-c")
HOSTILE_ID = "org-x"
LENGTH = DIM + len(STATS) + 1  # a contribution: adapter, statistics, weight

# A window opens only with the whole federation joined; silence costs one stage (1 s) or
# the deadline (2 s).
CONFIG = protocol_config(
    window=replace(protocol_config().window, deadline_s=2.0, min_cohort=3), round_timeout_s=1.0
)


def check_versions(sites: Sites) -> None:
    """Every committed version is the FedAvg step of its contributors' weighted deltas."""
    previous = np.zeros(DIM, dtype=np.float32)
    config = sites.coordinator.core.config
    assert [c.version for c in sites.commits] == list(range(1, len(sites.commits) + 1))
    for commit in sites.commits:
        want = expected_phi(config, sites.trainers, commit, previous)
        np.testing.assert_allclose(commit.phi, want, atol=TOL)
        previous = commit.phi
    assert dict(sites.coordinator.versions) == {
        c.version: vector_sha256(c.phi) for c in sites.commits
    }


# -- level 1: the agents' core messages, rewritten before framing -------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "how"), HOSTILE, ids=HOSTILE_IDS)
def test_a_hostile_agent_fails_alone_over_the_sessions(kind: type, how: str) -> None:
    def agent_fault() -> Callable[[str, ToCoordinator], ToCoordinator | None]:
        hostile = corrupt(kind, "org-b", how)  # fires once: one per executor

        def fault(boundary: str, message: ToCoordinator) -> ToCoordinator | None:
            out = hostile(boundary, COORDINATOR, message)
            assert out is None or isinstance(out, ToCoordinator)
            return out

        return fault

    sites = start_sites(CONFIG, HONEST, fault=agent_fault())
    try:
        assert sites.run(45.0), "the coordinator did not go on to its last window"
        outcomes = list(sites.coordinator.outcomes)
    finally:
        sites.close()
    first = outcomes[0]
    assert first.committed, first.reason
    if (kind, how) == (SharesSent, "signature"):
        # The recipient (org-a) cannot authenticate its share and declines (see test_cores).
        assert first.contributors == ("org-b", "org-c")
        assert "org-a" in dict(first.failed)
    elif kind in (ContributionSent,) or kind.__name__ in ("KeysAdvertised", "SharesSent"):
        assert first.contributors == ("org-a", "org-c")
        assert "org-b" in dict(first.failed), first.failed
    else:  # its masked vector was in before it misbehaved: the sum holds it
        assert first.contributors == HONEST
        assert "org-b" in dict(first.failed), first.failed
    check_versions(sites)
    # The coordinator goes on: every later window commits with all three.
    assert [o.committed for o in outcomes] == [True, True, True]
    assert outcomes[-1].contributors == HONEST
    # Window by window, the real services decide as the simulator's executor does.
    sim = simulated(Scenario("hostile", CONFIG, HONEST, fault=agent_fault()))
    real = [(o.window, o.committed, o.reason, o.contributors) for o in outcomes]
    assert [row[:4] for row in sim] == real


# -- level 2: a raw hostile client on the session's frames ---------------------------------------


def _ctx(window: int = 0) -> pb.FrameContext:
    return pb.FrameContext(window=window, nonce=os.urandom(16), run_id=CONFIG.run_id)


class HostileClient:
    """Dials `Coordinator.Session` itself with its own Ed25519 key and sends what it likes;
    a thread reads the coordinator's frames and the status that ends the stream."""

    def __init__(self, address: str, boundary: str = HOSTILE_ID) -> None:
        self.address = address
        self.boundary = boundary
        self.key = Ed25519PrivateKey.generate()
        self.channel = grpc.insecure_channel(address)
        self._out: queue.Queue[pb.AgentFrame | None] = queue.Queue()
        self.frames: queue.Queue[pb.CoordinatorFrame] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._call: grpc.Future | None = None  # type: ignore[type-arg]

    def hello(self, **overrides: object) -> pb.Hello:
        fields: dict[str, object] = {
            "boundary": self.boundary,
            "identity_key": self.key.public_key().public_bytes_raw(),
            "devices": 2,
            "layout_digest": LAYOUT,
            "base_model_digest": BASE,
            "tokenizer_digest": TOKENIZER,
            "dim": DIM,
            "held_version": -1,
        }
        fields.update(overrides)
        return pb.Hello(**fields)  # type: ignore[arg-type]

    def open(self, first: pb.AgentFrame | None = None) -> None:
        """A new session (on the same channel) that starts with `first` (a valid Hello)."""
        self._out = queue.Queue()
        self.frames = queue.Queue()
        self.error = None
        self.ended = threading.Event()
        self.send(first or pb.AgentFrame(context=_ctx(), hello=self.hello()))
        out = self._out

        def requests() -> Iterator[pb.AgentFrame]:
            while (frame := out.get()) is not None:
                yield frame

        call = coordinator_pb2_grpc.CoordinatorStub(self.channel).Session(requests())
        self._call = call  # type: ignore[assignment]
        frames, ended = self.frames, self.ended
        threading.Thread(target=self._read, args=(call, frames, ended), daemon=True).start()

    def _read(
        self,
        call: Iterator[pb.CoordinatorFrame],
        frames: queue.Queue[pb.CoordinatorFrame],
        ended: threading.Event,
    ) -> None:
        try:
            for frame in call:
                frames.put(frame)
        except grpc.RpcError as exc:
            if ended is self.ended:
                self.error = exc
        ended.set()

    def join(self) -> int:
        """Says hello and joins; returns the window the coordinator opens with it."""
        self.open()
        assert self.next_frame().WhichOneof("body") == "welcome"
        self.send(pb.AgentFrame(context=_ctx(), joined=pb.Joined(held_version=-1)))
        while True:
            frame = self.next_frame()
            if frame.WhichOneof("body") == "open_window":
                assert self.boundary in frame.open_window.cohort
                return int(frame.context.window)

    def next_frame(self, timeout_s: float = 30.0) -> pb.CoordinatorFrame:
        return self.frames.get(timeout=timeout_s)

    def send(self, frame: pb.AgentFrame) -> None:
        self._out.put(frame)

    def refusal(self, timeout_s: float = 30.0) -> tuple[grpc.StatusCode, str]:
        """The status that ended the session."""
        assert self.ended.wait(timeout_s), "the coordinator never ended the session"
        error = self.error
        assert isinstance(error, grpc.Call), error
        return error.code(), str(error.details())

    def close(self) -> None:
        self._out.put(None)
        if self._call is not None:
            self._call.cancel()
        self.channel.close()


def contribution(
    window: int, vector: np.ndarray, *, sha256: bytes | None = None
) -> list[pb.AgentFrame]:
    """A contribution's header and chunk frames; `sha256` overrides the header's digest."""
    header = vector_header(vector)
    if sha256 is not None:
        header.sha256 = sha256
    head = pb.ContributionHeader(base_version=0, devices=2, vector=header)
    frames = [pb.AgentFrame(context=_ctx(window), contribution=head)]
    frames += [pb.AgentFrame(context=_ctx(window), chunk=c) for c in iter_chunks(vector)]
    return frames


def masked(length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 2**32, length, dtype=np.uint32)


Attack = Callable[[int], list[pb.AgentFrame]]


def bad_digest(w: int) -> list[pb.AgentFrame]:
    return contribution(w, masked(), sha256=hashlib.sha256(b"another vector").digest())


def chunk_without_header(w: int) -> list[pb.AgentFrame]:
    chunk = common_pb2.VectorChunk(offset=0, data=masked().tobytes())
    return [pb.AgentFrame(context=_ctx(w), chunk=chunk)]


def wrong_length(w: int) -> list[pb.AgentFrame]:
    return contribution(w, masked(DIM))


def chunk_of_another_window(w: int) -> list[pb.AgentFrame]:
    head, *chunks = contribution(w, masked())
    chunks[0].context.window = w + 7
    return [head, *chunks]


def no_body(w: int) -> list[pb.AgentFrame]:
    return [pb.AgentFrame(context=_ctx(w))]


def header_then_joined(w: int) -> list[pb.AgentFrame]:
    head, *_ = contribution(w, masked())
    return [head, pb.AgentFrame(context=_ctx(w), joined=pb.Joined(held_version=0))]


# (attack, the status the hostile client gets, what its detail must say)
REFUSED: dict[str, tuple[Attack, grpc.StatusCode, tuple[str, ...]]] = {
    "digest-mismatch": (
        bad_digest,
        grpc.StatusCode.DATA_LOSS,
        ("ContributionHeader.vector", "SHA-256 of received bytes", "does not match the header"),
    ),
    "chunk-without-header": (
        chunk_without_header,
        grpc.StatusCode.INVALID_ARGUMENT,
        ("a chunk frame without a header, want a contribution frame before its chunks",),
    ),
    "wrong-length": (
        wrong_length,
        grpc.StatusCode.INVALID_ARGUMENT,
        (f"ContributionHeader.vector.length: got {DIM}, want {LENGTH}",),
    ),
    "chunk-of-another-window": (
        chunk_of_another_window,
        grpc.StatusCode.INVALID_ARGUMENT,
        ("chunk frame of window 8 inside a vector of window 1, want every chunk of window 1",),
    ),
    "no-body": (
        no_body,
        grpc.StatusCode.INVALID_ARGUMENT,
        ("AgentFrame.body: got None, want a window frame",),
    ),
    "frame-inside-a-vector": (
        header_then_joined,
        grpc.StatusCode.INVALID_ARGUMENT,
        ("a joined frame inside a vector (ContributionHeader.vector), want its chunks first",),
    ),
}

#: The raw client joins the cohort: every window has the three honest agents and it.
WITH_HOSTILE = replace(CONFIG, window=replace(CONFIG.window, min_cohort=4), windows=2)


def assert_honest_windows(sites: Sites, windows: int = 2) -> None:
    outcomes = list(sites.coordinator.outcomes)
    assert [o.committed for o in outcomes] == [True] * windows, outcomes
    for o in outcomes:
        assert o.contributors == HONEST, o
        assert HOSTILE_ID in dict(o.failed), o.failed
    check_versions(sites)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attack", list(REFUSED))
def test_a_hostile_client_breaking_the_frames_is_refused_and_the_window_goes_on(
    attack: str,
) -> None:
    send, code, says = REFUSED[attack]
    sites = start_sites(WITH_HOSTILE, HONEST)
    hostile = HostileClient(sites.address)
    try:
        w = hostile.join()
        for frame in send(w):
            hostile.send(frame)
        got, detail = hostile.refusal()
        assert got == code, (got, detail)
        for words in says:
            assert words in detail, detail
        # Its session is gone and it is out of window w, whose honest survivors go on.
        c = sites.coordinator
        assert c.wait(lambda: HOSTILE_ID not in c.status().sessions, 10.0)
        assert c.wait(lambda: bool(c.outcomes), 30.0)
        failed = dict(c.outcomes[0].failed)
        assert "protocol violation" in failed[HOSTILE_ID], failed
        # It comes back with the same key and says nothing: the next window goes on too.
        hostile.join()
        assert sites.run(30.0), "the coordinator did not go on to its last window"
        assert_honest_windows(sites)
        assert all(a.log.sessions == 1 and a.log.refused is None for a in sites.agents.values())
    finally:
        hostile.close()
        sites.close()


@pytest.mark.timeout(60)
def test_a_contribution_for_another_window_is_ignored_and_its_sender_times_out() -> None:
    sites = start_sites(WITH_HOSTILE, HONEST)
    hostile = HostileClient(sites.address)
    try:
        w = hostile.join()
        for frame in contribution(w + 7, masked()):
            hostile.send(frame)
        assert sites.run(30.0), "the coordinator did not go on to its last window"
        assert_honest_windows(sites)
        assert "no answer in stage KEYS" in dict(sites.coordinator.outcomes[0].failed)[HOSTILE_ID]
        assert not hostile.ended.is_set()  # a late or early frame is not a violation
    finally:
        hostile.close()
        sites.close()


@pytest.mark.timeout(60)
def test_bytes_that_fail_to_parse_end_the_session_and_the_window_goes_on() -> None:
    sites = start_sites(WITH_HOSTILE, HONEST)
    hostile = HostileClient(sites.address)
    raw = hostile.channel.stream_stream(
        "/echelon.coordinator.v1.Coordinator/Session",
        request_serializer=lambda b: b,
        response_deserializer=pb.CoordinatorFrame.FromString,
    )
    out: queue.Queue[bytes | None] = queue.Queue()
    frames: queue.Queue[pb.CoordinatorFrame | grpc.RpcError] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := out.get()) is not None:
            yield item

    def read() -> None:
        try:
            for frame in raw(requests()):
                frames.put(frame)
        except grpc.RpcError as exc:
            frames.put(exc)

    try:
        out.put(pb.AgentFrame(context=_ctx(), hello=hostile.hello()).SerializeToString())
        threading.Thread(target=read, daemon=True).start()
        joined = pb.AgentFrame(context=_ctx(), joined=pb.Joined(held_version=-1))
        out.put(joined.SerializeToString())
        while True:
            frame = frames.get(timeout=30)
            assert not isinstance(frame, grpc.RpcError), frame
            if frame.WhichOneof("body") == "open_window":
                break
        out.put(b"\xff\xff\xff\xff not a protobuf")
        while not isinstance(end := frames.get(timeout=30), grpc.RpcError):
            pass
        assert isinstance(end, grpc.Call)
        # gRPC itself refuses what it cannot deserialize, before the coordinator sees it;
        # the coordinator hears the stream end and fails the party.
        assert end.code() is grpc.StatusCode.INTERNAL, (end.code(), end.details())
        assert "deserializing" in str(end.details())
        c = sites.coordinator
        assert c.wait(lambda: bool(c.outcomes), 30.0)
        assert HOSTILE_ID in dict(c.outcomes[0].failed)
        hostile.join()  # back, silent
        assert sites.run(30.0), "the coordinator did not go on to its last window"
        assert_honest_windows(sites)
    finally:
        out.put(None)
        hostile.close()
        sites.close()


# -- Hello --------------------------------------------------------------------------------------

HONEST_ONLY = replace(CONFIG, windows=2)

BAD_HELLO: dict[str, tuple[dict[str, object], grpc.StatusCode, str]] = {
    "bad-boundary-id": (
        {"boundary": "Org X!"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "Hello.boundary: got 'Org X!', want [a-z0-9-]{1,63}",
    ),
    "short-identity-key": (
        {"identity_key": b"\x01" * 5},
        grpc.StatusCode.INVALID_ARGUMENT,
        "Hello.identity_key: got 5 bytes, want 32",
    ),
    "bound-id-another-key": (
        {"boundary": "org-a"},
        grpc.StatusCode.PERMISSION_DENIED,
        "Hello.identity_key: org-a is bound to another identity key",
    ),
    "other-model": (
        {"dim": DIM + 1},
        grpc.StatusCode.FAILED_PRECONDITION,
        "differs from the run's",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [*BAD_HELLO, "first-frame-not-hello"])
def test_a_bad_hello_is_refused_and_the_honest_run_goes_on(case: str) -> None:
    sites = start_sites(HONEST_ONLY, HONEST)
    hostile = HostileClient(sites.address)
    c = sites.coordinator
    try:
        # The honest agents are bound before the hostile one says hello.
        assert c.wait(lambda: c.pinned and set(HONEST) <= set(c.core.identities), 30.0)
        if case == "first-frame-not-hello":
            first = pb.AgentFrame(context=_ctx(), joined=pb.Joined(held_version=-1))
            code, says = grpc.StatusCode.INVALID_ARGUMENT, "AgentFrame.body: got joined, want hello"
        else:
            fields, code, says = BAD_HELLO[case]
            first = pb.AgentFrame(context=_ctx(), hello=hostile.hello(**fields))
        hostile.open(first)
        got, detail = hostile.refusal()
        assert got == code, (got, detail)
        assert says in detail, detail
        assert sites.run(30.0), "the coordinator did not go on to its last window"
        outcomes = c.outcomes
        assert [o.committed for o in outcomes] == [True, True]
        assert all(o.contributors == HONEST and not o.failed for o in outcomes), outcomes
        check_versions(sites)
        # No honest session was replaced or refused.
        assert all(a.log.sessions == 1 and a.log.refused is None for a in sites.agents.values())
        assert HOSTILE_ID not in c.core.identities
        assert hostile.frames.empty()  # not even a Welcome
    finally:
        hostile.close()
        sites.close()
