"""Attacks on the coordinator's identities over real gRPC with mTLS (tests/security/harness.py):
a client without a certificate, with one from another root, with a valid certificate
claiming another party's id or role, with a certificate the federation's CA issued over a
key the manifest does not pin, an outsider registering a boundary's public key, a stolen
TLS key without the identity key, and a registration proof replayed from another run.

Each attack runs while the run is held at its first training step (the window is open, no
key has been sent). Each asserts the refusal's status and message, that the attacker's
transcript is empty (not even a Welcome: none of the victim's shares, masked vectors or
statistics), that the coordinator's refusal of a registration it could read is on the
audit log, and that the honest boundaries' global versions have the same SHA-256 as in
the same run without the attack.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.record import PayloadType
from echelon.trust.enrolment import PartyKeys
from echelon.trust.kit import CA_CERT, Kit
from echelon.trust.manifest import PartyRole
from echelon.trust.pki import (
    CertificateAuthority,
    certificate_pem,
    load_certificate,
    load_tls_key,
    private_key_pem,
)
from tests.trust.conftest import make_federation

from .harness import (
    CONFIG,
    Run,
    Transcript,
    attempt_session,
    ca_only_channel,
    hello_frame,
    kit_channel,
)

pytestmark = pytest.mark.timeout(120)
Attack = Callable[[Run, Path], Transcript]


def _manifest_key(run: Run, party: str) -> bytes:
    found = run.kit("coordinator").manifest.party(party)
    assert found is not None
    return found.identity_key


def no_certificate(run: Run, _tmp: Path) -> Transcript:
    channel = ca_only_channel(run.address, run.kit("org-a"))
    return attempt_session(channel, hello_frame("org-a", _manifest_key(run, "org-a")))


def another_root(run: Run, tmp: Path) -> Transcript:
    """A certificate for org-a from a federation with the same party names and run id under
    another root and CA, presented to the real coordinator (whose CA certificate is public:
    the attacker trusts it, so the handshake gets as far as the client's certificate)."""
    other = make_federation(tmp / "other", run_id=CONFIG.run_id)
    kit = other.kit("org-a")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=run.kit("org-a").ca_certificate_pem,
        private_key=kit.tls_key_pem,
        certificate_chain=kit.certificate_pem,
    )
    channel = grpc.secure_channel(
        run.address, credentials, options=[("grpc.ssl_target_name_override", "coordinator")]
    )
    frame = hello_frame("org-a", kit.identity_key.public_key().public_bytes_raw(),
                        prove_with=kit.identity_key)  # fmt: skip
    return attempt_session(channel, frame)


def another_partys_id(run: Run, _tmp: Path) -> Transcript:
    """org-b, a valid party, registers as org-a with org-a's public identity key."""
    frame = hello_frame("org-a", _manifest_key(run, "org-a"))
    return attempt_session(kit_channel(run.address, run.kit("org-b")), frame)


def an_auditors_role(run: Run, _tmp: Path) -> Transcript:
    """The auditor, a manifest party, opens a boundary's window session."""
    kit = run.kit("auditor")
    frame = hello_frame("auditor", kit.identity_key.public_key().public_bytes_raw(),
                        prove_with=kit.identity_key)  # fmt: skip
    return attempt_session(kit_channel(run.address, kit), frame)


def an_unpinned_key(run: Run, _tmp: Path) -> Transcript:
    """The federation's CA (its key leaked, or misused) issues a certificate for org-a
    over a fresh key: the manifest pins org-a's TLS key, so the certificate is refused."""
    root = run.root / "kits" / "root"
    ca = CertificateAuthority(
        key=load_tls_key((root / "ca.key").read_bytes(), "ca.key"),
        certificate=load_certificate((root / CA_CERT).read_bytes(), CA_CERT),
    )
    keys = PartyKeys.generate()
    from datetime import UTC, datetime

    cert = ca.issue(keys.enrolment("org-a", "org-a").request, identity="org-a",
                    role=PartyRole.BOUNDARY, now=datetime.now(UTC))  # fmt: skip
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certificate_pem(ca.certificate),
        private_key=private_key_pem(keys.tls_key),
        certificate_chain=certificate_pem(cert),
    )
    channel = grpc.secure_channel(
        run.address, credentials, options=[("grpc.ssl_target_name_override", "coordinator")]
    )
    return attempt_session(channel, hello_frame("org-a", _manifest_key(run, "org-a")))


def a_stolen_tls_key(run: Run, _tmp: Path) -> Transcript:
    """org-a's TLS key without its identity key: the proof of possession fails."""
    frame = hello_frame(
        "org-a", _manifest_key(run, "org-a"), prove_with=Ed25519PrivateKey.generate()
    )
    return attempt_session(kit_channel(run.address, run.kit("org-a")), frame)


def a_proof_from_another_run(run: Run, _tmp: Path) -> Transcript:
    """org-a's genuine proof of possession, signed for another run, replayed into this one
    (by someone holding org-a's TLS key)."""
    kit: Kit = run.kit("org-a")
    frame = hello_frame("org-a", _manifest_key(run, "org-a"), prove_with=kit.identity_key,
                        proof_run_id="another-run")  # fmt: skip
    return attempt_session(kit_channel(run.address, kit), frame)


# attack -> (status, words of its message, whether the coordinator could read the Hello and
# so records the refusal on the audit log)
ATTACKS: dict[str, tuple[Attack, grpc.StatusCode, str, bool]] = {
    "no client certificate": (
        no_certificate,
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses",
        False,
    ),
    "a certificate of another root": (
        another_root,
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses",
        False,
    ),
    "a valid certificate claiming another party's id": (
        another_partys_id,
        grpc.StatusCode.PERMISSION_DENIED,
        "the peer certificate is 'org-b''s; a boundary registers only as itself",
        True,
    ),
    "a valid certificate of another role": (
        an_auditors_role,
        grpc.StatusCode.PERMISSION_DENIED,
        "peer auditor: role auditor",
        False,
    ),
    "a certificate over a key the manifest does not pin": (
        an_unpinned_key,
        grpc.StatusCode.PERMISSION_DENIED,
        "its key is not the one the manifest pins for org-a",
        False,
    ),
    "a stolen TLS key without the identity key": (
        a_stolen_tls_key,
        grpc.StatusCode.UNAUTHENTICATED,
        "proof_of_possession: does not verify under org-a's identity key",
        True,
    ),
    "a proof of possession from another run": (
        a_proof_from_another_run,
        grpc.StatusCode.UNAUTHENTICATED,
        "proof_of_possession: does not verify",
        True,
    ),
}


# A refusal in the TLS handshake never reaches the service's code (no call exists, so
# nothing can go on the audit log): gRPC's TLS layer logs it, with its reason, on the
# service's standard error, which is its log. attack -> the reason the server logs.
HANDSHAKE_REFUSALS = {
    "no client certificate": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "a certificate of another root": "CERTIFICATE_VERIFY_FAILED",
}


@contextmanager
def standard_error_in(path: Path) -> Iterator[Path]:
    """Points this process's file descriptor 2 (where gRPC's core logs) at `path` while the
    block runs, and back afterwards; Python's own sys.stderr object is left alone."""
    saved = os.dup(2)
    with path.open("wb") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield path
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def logged(path: Path, reason: str, within_s: float = 30.0) -> str:
    """Waits for gRPC's handshake failure line with `reason` in `path`, where the in-process
    coordinator's standard error goes; returns what was logged (an AssertionError with the
    log's tail if the line did not come within `within_s`)."""
    seen, text = threading.Event(), ""
    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        text = path.read_text(errors="replace")
        if "Handshake failed with error SSL_ERROR_SSL" in text and reason in text:
            return text
        seen.wait(0.05)
    tail = text[-2000:]
    raise AssertionError(f"no handshake failure with {reason} logged; the log ends:\n{tail}")


@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_on_identities_is_refused_and_the_run_is_unchanged(
    name: str, run: Run, tmp_path: Path, baseline: list[str]
) -> None:
    attack, code, says, audited = ATTACKS[name]

    with standard_error_in(tmp_path / "stderr.log") as log:
        transcript = attack(run, tmp_path)
        if name in HANDSHAKE_REFUSALS:
            logged(log, HANDSHAKE_REFUSALS[name])
            # The attacker accepted the coordinator's certificate: the failure logged is the
            # server's check of the client, not the client's of the server.
            assert "CERTIFICATE_VERIFY_FAILED" not in transcript.detail, transcript.detail

    assert transcript.code == code, transcript
    assert says in transcript.detail, transcript.detail
    assert transcript.frames == []  # not even a Welcome
    assert run.finish() == baseline  # the same global versions as without the attack
    refusals = [r for r in run.refusals() if r.payload_type == PayloadType.KEY_REGISTRATION]
    if audited:
        assert len(refusals) == 1, refusals
        assert refusals[0].receiver == "coordinator"
        assert "registration as 'org-a' refused" in refusals[0].verdict.reason
    else:
        assert refusals == []
    # No honest session was refused or replaced.
    assert all(a.log.refused is None for a in run.sites.agents.values())
