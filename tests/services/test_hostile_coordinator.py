"""A hostile coordinator: a gRPC server of its own on `Coordinator.Session` that welcomes the
agent, then sends a global adapter that does not match its header (chunks whose SHA-256
is not the header's, a vector of another length, a chunk without a header, a frame inside
a vector). The real `AgentSession` refuses it: its session ends (the coordinator's
failure, not a reason for the agent to stop), the version its core holds does not change,
and it dials again, where an honest global adapter is installed."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from echelon.protocol import BoundaryCore
from echelon_proto.common.v1 import common_pb2
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.boundary_agent.session import AgentSession, Backoff, Hello
from services.common.server import RunningServer, ServerConfig, start_server
from services.common.wire import iter_chunks, vector_header
from tests.protocol.harness import DIM, ScriptedTrainer, protocol_config
from tests.services.sessions import BASE, LAYOUT, TOKENIZER

pytestmark = pytest.mark.timeout(60)

CONFIG = protocol_config()
RUN_CONFIG = b"a run declaration"
GOOD = np.arange(DIM, dtype=np.float32) / DIM


def _frame(window: int = 1, **body: object) -> pb.CoordinatorFrame:
    ctx = pb.FrameContext(window=window, nonce=os.urandom(16), run_id=CONFIG.run_id)
    return pb.CoordinatorFrame(context=ctx, **body)  # type: ignore[arg-type]


def global_version(
    vector: np.ndarray, *, sha256: bytes | None = None, sent: np.ndarray | None = None
) -> list[pb.CoordinatorFrame]:
    """A global adapter's header (for `vector`, `sha256` overriding its digest) and the
    chunks of `sent` (default: `vector`)."""
    header = vector_header(vector)
    if sha256 is not None:
        header.sha256 = sha256
    head = pb.GlobalHeader(version=0, vector=header)
    chunks = iter_chunks(vector if sent is None else sent)
    return [_frame(global_version=head)] + [_frame(chunk=c) for c in chunks]


# attack -> (frames, what the agent's refusal says)
ATTACKS: dict[str, tuple[list[pb.CoordinatorFrame], str]] = {
    "digest-mismatch": (
        global_version(GOOD, sha256=hashlib.sha256(b"another adapter").digest()),
        "GlobalHeader.vector: SHA-256 of received bytes",
    ),
    "chunks-of-another-vector": (
        global_version(GOOD, sent=GOOD * 2),
        "GlobalHeader.vector: SHA-256 of received bytes",
    ),
    "wrong-length": (
        global_version(GOOD[:-1]),
        f"GlobalHeader.vector.length: got {DIM - 1}, want {DIM}",
    ),
    "chunk-without-header": (
        [_frame(chunk=common_pb2.VectorChunk(offset=0, data=GOOD.tobytes()))],
        "a chunk frame without a header, want a global_version frame before its chunks",
    ),
    "frame-inside-a-vector": (
        [*global_version(GOOD)[:1], _frame(window_aborted=pb.WindowAborted(reason="x"))],
        "a window_aborted frame inside a vector (GlobalHeader.vector)",
    ),
}


class HostileCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Welcomes every session, then sends the next session's frames from `script` (an
    honest global adapter once the script is used up) and waits for the agent to go."""

    def __init__(self, script: list[list[pb.CoordinatorFrame]]) -> None:
        self.script = list(script)
        self.hellos: list[pb.Hello] = []
        self.ended = 0
        self.changed = threading.Condition()

    def Session(
        self, request_iterator: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorFrame]:
        first = next(request_iterator)
        ended = threading.Event()

        def on_end() -> None:  # gRPC stops pulling frames from a cancelled session
            ended.set()
            with self.changed:
                self.ended += 1
                self.changed.notify_all()

        context.add_callback(on_end)
        with self.changed:
            self.hellos.append(first.hello)
            frames = self.script.pop(0) if self.script else global_version(GOOD)
            self.changed.notify_all()
        welcome = pb.Welcome(
            run_id=CONFIG.run_id,
            run_config=RUN_CONFIG,
            run_config_sha256=hashlib.sha256(RUN_CONFIG).digest(),
        )
        yield _frame(0, welcome=welcome)
        yield from frames
        ended.wait(30)  # the agent hangs up (or the test ends)

    def wait(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout_s)


def start_agent(
    script: list[list[pb.CoordinatorFrame]],
) -> tuple[HostileCoordinator, RunningServer, AgentSession]:
    hostile = HostileCoordinator(script)  # type: ignore[abstract]
    server = start_server(
        ServerConfig(),
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(hostile, s),
        ["echelon.coordinator.v1.Coordinator"],
    )
    key = Ed25519PrivateKey.generate()
    trainer = ScriptedTrainer("org-a")
    core = BoundaryCore(
        CONFIG, boundary="org-a", theta0=np.zeros(DIM, np.float32), identity=key, identities={}
    )
    agent = AgentSession(
        lambda welcome: core,
        address=f"127.0.0.1:{server.port}",
        hello=Hello(
            boundary="org-a",
            identity_key=key.public_key().public_bytes_raw(),
            devices=2,
            dim=DIM,
            layout_digest=LAYOUT,
            base_model_digest=BASE,
            tokenizer_digest=TOKENIZER,
        ),
        run_id=CONFIG.run_id,
        train=lambda command: trainer.train(command, 0.0)[0],
        backoff=Backoff(first_s=0.05, max_s=0.2),
    )
    agent.start()
    return hostile, server, agent


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_bad_global_adapter_is_refused_and_the_agent_dials_again(attack: str) -> None:
    frames, says = ATTACKS[attack]
    with capture_logs() as logs:
        hostile, server, agent = start_agent([frames])
        try:
            # The agent hangs up on the bad frames and dials again, nothing installed.
            assert hostile.wait(lambda: hostile.ended >= 1 and len(hostile.hellos) >= 2)
            assert hostile.hellos[1].held_version == -1
            assert agent.log.refused is None
            # The honest adapter of the next session is installed, and training starts.
            assert agent.wait(lambda: agent.status().held_version == 0, 30)
            assert agent.core is not None
            np.testing.assert_array_equal(agent.core.phi, GOOD)
        finally:
            agent.stop()
            server.stop(0)
    refusals = [e for e in logs if e["event"] == "coordinator_protocol_violation"]
    assert len(refusals) == 1, refusals
    assert says in refusals[0]["error"], refusals[0]
