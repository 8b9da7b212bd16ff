"""The boundary agent takes the run's declaration only when it matches its registration."""

from __future__ import annotations

import pytest

from echelon.declaration import ModelIdentity, RunDeclaration
from echelon_proto.coordinator.v1 import coordinator_pb2
from services.boundary_agent.coordinator_link import RegistrationRefused, _declaration

MODEL = ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 64)


def _request(dim: int = MODEL.dim) -> coordinator_pb2.RegisterRequest:
    return coordinator_pb2.RegisterRequest(
        boundary="org-a",
        layout_digest=MODEL.layout_digest,
        base_model_digest=MODEL.base_model_digest,
        tokenizer_digest=MODEL.tokenizer_digest,
        dim=dim,
    )


def _response(run_id: str = "run", config: bytes | None = None) -> coordinator_pb2.RegisterResponse:
    body = RunDeclaration(run_id="run", model=MODEL).to_canonical_bytes()
    return coordinator_pb2.RegisterResponse(run_id=run_id, run_config=config or body)


def test_the_agent_takes_a_declaration_that_matches_its_registration() -> None:
    declaration = _declaration(_request(), _response())

    assert declaration == RunDeclaration(run_id="run", model=MODEL)


@pytest.mark.parametrize(
    ("request_", "response", "words"),
    [
        (_request(dim=65), _response(), "declaration.model"),
        (_request(), _response(run_id="other"), "RegisterResponse.run_id"),
        (_request(), _response(config=b'{"run_id":"run"}'), "declaration.model: missing"),
    ],
)
def test_the_agent_refuses_a_declaration_that_does_not_match(
    request_: coordinator_pb2.RegisterRequest,
    response: coordinator_pb2.RegisterResponse,
    words: str,
) -> None:
    with pytest.raises(RegistrationRefused, match=words):
        _declaration(request_, response)
