"""What the security tests share: a federated run over real gRPC with mTLS (every party from
its kit of a provisioned, signed manifest: tests/services/sessions.py with `kits`), held at
a protocol stage while an attack runs, and an attacker's raw session with the coordinator
that keeps its whole transcript.

A run's honest result is the SHA-256 of each committed global version; the scripted
trainers and fixed rounding seeds make it the same in every run of the same federation
configuration, whatever the keys, so an attacked run is compared with an unattacked one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.record import AuditRecord, Direction
from echelon.protocol import ProtocolConfig
from echelon.protocol.events import Train
from echelon.trust.kit import Kit, load_kit
from echelon.trust.registration import prove_registration
from echelon_proto.coordinator.v1 import coordinator_pb2_grpc
from echelon_proto.coordinator.v1 import session_pb2 as pb
from services.common.tls import secure_channel
from tests.protocol.harness import DIM
from tests.services.sessions import (
    BASE,
    LAYOUT,
    ORGS,
    TOKENIZER,
    Sites,
    federation_config,
    start_sites,
)

# The run is held at its first training step while an attack runs: a deadline and stage
# timers long enough that the hold never costs a window.
_BASE = federation_config()
CONFIG = federation_config(window=replace(_BASE.window, deadline_s=60.0), round_timeout_s=30.0)
TIMEOUT_S = 20.0


def digests(sites: Sites) -> list[str]:
    """SHA-256 of every global version the run committed, in order."""
    return [hashlib.sha256(c.phi.tobytes()).hexdigest() for c in sites.commits]


@dataclass
class Run:
    """A federated run with mTLS in `root`, its devices held until `release()`."""

    root: Path
    sites: Sites
    released: threading.Event = field(default_factory=threading.Event)

    def kit(self, party: str) -> Kit:
        return load_kit(self.root / "kits" / party)

    @property
    def address(self) -> str:
        return self.sites.address

    @property
    def audit_address(self) -> str:
        assert self.sites.audit is not None
        return f"127.0.0.1:{self.sites.audit.server.port}"

    def release(self) -> None:
        self.released.set()

    def finish(self) -> list[str]:
        """Lets the devices train, waits for the run to end; the versions' digests."""
        self.release()
        assert self.sites.run(60.0), "the honest run did not finish"
        last = len(self.sites.commits)
        for agent in self.sites.agents.values():  # each received (and recorded) the last one
            assert agent.wait(lambda a=agent: a.status().held_version >= last, TIMEOUT_S)
        self.records()  # every party's pipelined records are on the log
        return digests(self.sites)

    def records(self) -> list[AuditRecord]:
        return self.sites.records()

    def refusals(self) -> list[AuditRecord]:
        """Records of payloads refused on receipt (registrations, runs)."""
        return [
            r
            for r in self.records()
            if r.direction == Direction.RECEIVED and not r.verdict.accepted
        ]


def start_run(
    root: Path,
    *,
    state: bool = True,
    config: ProtocolConfig = CONFIG,
    names: tuple[str, ...] = ORGS,
    revoked: tuple[str, ...] = (),
) -> Run:
    """Starts the federation; every device waits at its first training run until
    `Run.release()` (the window is open, keys not yet sent). `revoked` boundaries were
    in version 1 of the manifest and are not in version 2, which the run uses."""
    held: list[Run] = []
    ready = threading.Event()

    def gate(_sites: Sites, _boundary: str, _train: Train) -> None:
        ready.wait(TIMEOUT_S)
        held[0].released.wait(TIMEOUT_S * 3)

    sites = start_sites(
        config,
        names,
        revoked=revoked,
        audit=root,
        kits=root / "kits",
        state=root / "state" if state else None,
        gate=gate,
    )
    run = Run(root, sites)
    held.append(run)
    ready.set()
    return run


def honest_digests(root: Path) -> list[str]:
    """The same federation run without any attack."""
    run = start_run(root)
    try:
        return run.finish()
    finally:
        run.sites.close()


def kit_channel(address: str, kit: Kit, server: str = "coordinator") -> grpc.Channel:
    return secure_channel(address, kit, server)


def ca_only_channel(address: str, kit: Kit, server: str = "coordinator") -> grpc.Channel:
    """TLS that trusts the federation's CA but presents no client certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=kit.ca_certificate_pem)
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", server)]
    )


def hello_frame(
    boundary: str,
    identity_key: bytes,
    *,
    run_id: str = CONFIG.run_id,
    prove_with: Ed25519PrivateKey | None = None,
    proof_run_id: str | None = None,
    nonce: bytes | None = None,
) -> pb.AgentFrame:
    """A Hello as an agent sends it; its proof signed by `prove_with` over `proof_run_id`."""
    nonce = nonce or os.urandom(16)
    proof = (
        prove_registration(prove_with, proof_run_id or run_id, boundary, nonce)
        if prove_with is not None
        else os.urandom(64)
    )
    return pb.AgentFrame(
        context=pb.FrameContext(run_id=run_id, nonce=nonce),
        hello=pb.Hello(
            boundary=boundary,
            identity_key=identity_key,
            devices=2,
            layout_digest=LAYOUT,
            base_model_digest=BASE,
            tokenizer_digest=TOKENIZER,
            dim=DIM,
            held_version=-1,
            proof_of_possession=proof,
        ),
    )


@dataclass
class Transcript:
    """What an attacker's session got: every frame, and the status that ended it."""

    frames: list[pb.CoordinatorFrame]
    code: grpc.StatusCode | None
    detail: str

    def bodies(self) -> set[str]:
        return {str(f.WhichOneof("body")) for f in self.frames}


def attempt_session(channel: grpc.Channel, first: pb.AgentFrame) -> Transcript:
    """Opens `Coordinator.Session` on `channel` with `first` and reads until the stream
    ends (a refusal) or the first frame arrives (then closes it)."""
    done = threading.Event()

    def requests() -> Iterator[pb.AgentFrame]:
        yield first
        done.wait(TIMEOUT_S)

    frames: list[pb.CoordinatorFrame] = []
    call = coordinator_pb2_grpc.CoordinatorStub(channel).Session(requests(), timeout=TIMEOUT_S)
    code: grpc.StatusCode | None = None
    detail = ""
    try:
        for frame in call:
            frames.append(frame)
            break  # anything at all is already too much for an attacker
    except grpc.RpcError as exc:
        code, detail = exc.code(), str(exc.details())
    finally:
        done.set()
        call.cancel()
        channel.close()
    return Transcript(frames, code, detail)


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status and detail of a call that must fail."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), str(exc.details())
    raise AssertionError("the call was not refused")
