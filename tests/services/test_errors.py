"""The one table from errors to gRPC status codes (`services.common.errors`)."""

from __future__ import annotations

import grpc
import pytest

from echelon.audit.errors import (
    AppendRefused,
    CounterReplay,
    PolicyViolation,
    RecordError,
    SignatureError,
    StoreCorrupted,
)
from echelon.policy import ExportRefused
from echelon.secagg import InvalidSignature, MalformedMessage, StageError
from services.audit_log.client import InvalidRecord, RemoteAppendRefused, RemoteCounterReplay
from services.common.errors import status_of
from services.common.validate import RequestError

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StageError("unmask before masked input"), S.FAILED_PRECONDITION),
        (ExportRefused("devices: got 1, want >= 2"), S.FAILED_PRECONDITION),
        (PolicyViolation("MASKED_DELTA", "cohort too small", index=3), S.FAILED_PRECONDITION),
        (PermissionError("party 2 is alive"), S.PERMISSION_DENIED),
        (InvalidSignature("survivor list"), S.PERMISSION_DENIED),
        (MalformedMessage("advertisement: 3 bytes"), S.INVALID_ARGUMENT),
        (RecordError("record.window", expected=">= 0", found=-1), S.INVALID_ARGUMENT),
        (SignatureError("record", expected="a valid signature", found="x"), S.PERMISSION_DENIED),
        (CounterReplay("counter 1"), S.ALREADY_EXISTS),
        (AppendRefused("not registered"), S.UNAVAILABLE),
        (StoreCorrupted("leaf 3"), S.UNAVAILABLE),
    ],
)
def test_library_errors_map_to_one_code(error: Exception, code: grpc.StatusCode) -> None:
    got = status_of("SomeRequest", error)

    assert got is not None and got.code == code
    assert got.message.startswith("SomeRequest")


def test_audit_log_refusals_met_while_recording_egress_are_unavailable() -> None:
    for error in (
        InvalidRecord("AppendRequest.record: 0 bytes"),
        RemoteAppendRefused("unknown signer"),
        RemoteCounterReplay("counter 1", expected="a fresh counter", found="counter 1"),
    ):
        got = status_of("OpenWindowRequest", error)

        assert got is not None and got.code == S.UNAVAILABLE, error
        assert got.message.startswith("OpenWindowRequest: audit log refused the record, not sent")


def test_message_says_what_was_wrong_and_what_was_wanted() -> None:
    record = status_of("AppendRequest", RecordError("record.window", expected=">= 0", found=-1))
    refused = status_of("CollectDeltaRequest", ExportRefused("devices: got 1, want >= 2"))

    assert record is not None and record.message == "AppendRequest.record.window: got -1, want >= 0"
    assert refused is not None
    want = "CollectDeltaRequest: export policy refused: devices: got 1, want >= 2"
    assert refused.message == want


def test_request_errors_keep_their_code_and_others_are_not_covered() -> None:
    request = RequestError(S.ALREADY_EXISTS, "RegisterRequest.ref: nonce already used")

    assert status_of("RegisterRequest", request) is request
    assert status_of("RegisterRequest", KeyError("version 3")) is None
    assert status_of("RegisterRequest", Exception()) is None  # what context.abort raises
