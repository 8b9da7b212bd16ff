"""The boundary agent takes the run's declaration (Welcome.run_config) only when it is a
valid declaration for the model this boundary runs (`accept_declaration`)."""

from __future__ import annotations

import pytest

from echelon.declaration import DeclarationError, ModelIdentity, RunDeclaration
from services.boundary_agent.__main__ import accept_declaration

MODEL = ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 64)
BODY = RunDeclaration(run_id="run", model=MODEL).to_canonical_bytes()


def test_the_agent_takes_a_declaration_for_its_model() -> None:
    assert accept_declaration(BODY, MODEL, "org-a") == RunDeclaration(run_id="run", model=MODEL)


@pytest.mark.parametrize(
    ("model", "body", "error", "words"),
    [
        (
            ModelIdentity(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, 65),
            BODY,
            ValueError,
            "org-a: the run declares model ModelIdentity(",
        ),
        (
            ModelIdentity(b"\x01" * 32, b"\x09" * 32, b"\x03" * 32, 64),
            BODY,
            ValueError,
            "this boundary runs ModelIdentity(",
        ),
        (MODEL, b'{"run_id":"run"}', DeclarationError, "declaration.model: missing"),
        (MODEL, b"\xff\xfe not json", DeclarationError, "want canonical JSON"),
        (MODEL, b"", DeclarationError, "want canonical JSON"),
        (
            MODEL,
            BODY.replace(b'"run_id":"run"', b'"run_id": "run"'),
            DeclarationError,
            "want the canonical one",
        ),
    ],
    ids=["other-dim", "other-base-model", "no-model", "garbage", "empty", "not-canonical"],
)
def test_the_agent_refuses_a_declaration_that_does_not_match(
    model: ModelIdentity, body: bytes, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(")):
        accept_declaration(body, model, "org-a")
