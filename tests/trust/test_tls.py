"""mTLS over real gRPC on localhost: a server with a kit's credentials resolves a kit client
to its manifest party, and refuses a client of another CA, a plaintext client, a client
without a certificate, a certificate over a key the manifest does not pin, and a party of a
role the call does not allow."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

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
from services.common.tls import (
    authorize_peer,
    secure_channel,
    server_credentials,
)

from .conftest import NOW, Federation

pytestmark = pytest.mark.timeout(60)

WHO = "/echelon.test.v1.Trust/Who"  # any party: answers the caller's party id
BOUNDARY_ONLY = "/echelon.test.v1.Trust/BoundaryOnly"
TIMEOUT_S = 10.0


class Server:
    """A real gRPC server with the coordinator's kit, on an ephemeral localhost port."""

    def __init__(self, kit: Kit) -> None:
        manifest = kit.manifest

        def who(_request: bytes, context: grpc.ServicerContext) -> bytes:
            return authorize_peer(context, manifest).party_id.encode()

        def boundary_only(_request: bytes, context: grpc.ServicerContext) -> bytes:
            return authorize_peer(context, manifest, {PartyRole.BOUNDARY}).party_id.encode()

        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "BoundaryOnly": grpc.unary_unary_rpc_method_handler(boundary_only),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("echelon.test.v1.Trust", handlers),)
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials(kit))
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def server(federation: Federation) -> Iterator[Server]:
    running = Server(federation.kit("coordinator"))
    yield running
    running.stop()


def _call(channel: grpc.Channel, method: str = WHO) -> str:
    with channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        answer: bytes = call(b"", timeout=TIMEOUT_S)
    return answer.decode()


def _kit_channel(server: Server, kit: Kit, server_party: str = "coordinator") -> grpc.Channel:
    return secure_channel(server.target, kit, server_party)


def _refusal(channel: grpc.Channel, method: str = WHO) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        _call(channel, method)
    return exc.value


@pytest.mark.parametrize("party", ["org-a", "org-b", "auditor"])
def test_a_kit_client_is_resolved_to_its_party(
    federation: Federation, server: Server, party: str
) -> None:
    assert _call(_kit_channel(server, federation.kit(party))) == party


def test_a_client_of_another_ca_is_refused_in_the_handshake(
    server: Server, other_federation: Federation
) -> None:
    refused = _refusal(_kit_channel(server, other_federation.kit("org-a")))

    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_refused(server: Server) -> None:
    refused = _refusal(grpc.insecure_channel(server.target))

    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_is_refused(federation: Federation, server: Server) -> None:
    ca = (federation.out / "org-a" / CA_CERT).read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", "coordinator")]

    refused = _refusal(grpc.secure_channel(server.target, credentials, options=options))

    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def _certificate_from_the_federation_ca(
    federation: Federation, name: str
) -> tuple[bytes, bytes, bytes]:
    """(key, certificate, CA) PEMs: the CA (whose key leaked, or was misused) signs a
    certificate for `name` over a fresh key the manifest does not pin."""
    root = federation.out / "root"
    ca = CertificateAuthority(
        key=load_tls_key((root / "ca.key").read_bytes(), "ca.key"),
        certificate=load_certificate((root / CA_CERT).read_bytes(), CA_CERT),
    )
    keys = PartyKeys.generate()
    request = keys.enrolment(name, name).request
    cert = ca.issue(request, identity=name, role=PartyRole.BOUNDARY, now=NOW)
    return private_key_pem(keys.tls_key), certificate_pem(cert), certificate_pem(ca.certificate)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("org-a", "names org-a but its key is not the one the manifest pins"),
        ("mallory", "names ['mallory'], want the certificate identity of exactly one party"),
    ],
)
def test_a_ca_certificate_that_is_no_manifest_party_is_denied(
    federation: Federation, server: Server, name: str, message: str
) -> None:
    key, cert, ca = _certificate_from_the_federation_ca(federation, name)
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    options = [("grpc.ssl_target_name_override", "coordinator")]

    refused = _refusal(grpc.secure_channel(server.target, credentials, options=options))

    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert message in str(refused.details())


def test_a_party_of_another_role_is_denied(federation: Federation, server: Server) -> None:
    refused = _refusal(_kit_channel(server, federation.kit("auditor")), BOUNDARY_ONLY)

    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "peer auditor: role auditor, want one of ['boundary']" in str(refused.details())


def test_a_boundary_may_call_a_boundary_only_method(federation: Federation, server: Server) -> None:
    assert _call(_kit_channel(server, federation.kit("org-b")), BOUNDARY_ONLY) == "org-b"


def test_a_client_refuses_a_server_that_is_not_the_party_it_dials(
    federation: Federation, server: Server
) -> None:
    """The coordinator's server answers, but the client wanted the audit log."""
    refused = _refusal(_kit_channel(server, federation.kit("org-a"), server_party="audit-log"))

    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_a_boundary_certificate_cannot_serve(federation: Federation) -> None:
    """A boundary's certificate carries client auth only: no client accepts it as a server."""
    rogue = Server(federation.kit("org-b"))
    try:
        refused = _refusal(_kit_channel(rogue, federation.kit("org-a"), server_party="org-b"))
    finally:
        rogue.stop()

    assert refused.code() == grpc.StatusCode.UNAVAILABLE
