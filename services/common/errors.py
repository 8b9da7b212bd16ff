"""One table from the errors a request can meet to gRPC status codes, for every servicer.

A servicer method runs its body under `status_on_error(context, rpc)`; the first row of
`STATUS` that matches the error gives the status code, and the message says what was wrong
and what was wanted: `"<Request>.<field>: got <found>, want <expected>"` for a request that
fails validation (`validate.RequestError`, and the audit library's `RecordError`, which names
the record field), else `"<Request>: <refusal>: <detail>"`. Errors no row matches propagate
(gRPC answers UNKNOWN), as does `context.abort` called inside the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import structlog

from echelon.audit.errors import (
    AuditError,
    CounterReplay,
    KeyConflict,
    LogRangeError,
    NotAParty,
    PolicyViolation,
    RecordError,
    SignatureError,
    UnknownSigner,
)
from echelon.policy import ExportRefused
from echelon.secagg import (
    ConsistencyError,
    InsufficientSignatures,
    InvalidSignature,
    SecAggError,
    ShareAuthenticationError,
    StageError,
    WrongWindow,
)
from services.audit_log.client import RemoteAuditError
from services.common.validate import RequestError, abort

log = structlog.get_logger(__name__)

_RECORD_REFUSED = "audit log refused the record, not sent"


@dataclass(frozen=True)
class StatusRule:
    """Errors of `errors` answer `code`. `refusal` names what refused, in the caller's terms
    ("" when the error's own text says it); `names_field` marks an error whose text starts
    with a field of the request (`"<field>: got ..., want ..."`)."""

    errors: tuple[type[Exception], ...]
    code: grpc.StatusCode
    refusal: str = ""
    names_field: bool = False

    def message(self, rpc: str, exc: Exception) -> str:
        if self.names_field:
            return f"{rpc}.{exc}"
        return f"{rpc}: {self.refusal}: {exc}" if self.refusal else f"{rpc}: {exc}"


S = grpc.StatusCode
# The first matching row wins, so a narrower error comes before its base class.
STATUS: tuple[StatusRule, ...] = (
    # The window does not fit the state it arrived in.
    StatusRule((StageError, WrongWindow), S.FAILED_PRECONDITION),
    # Policies refused: the boundary's export policy, a party's egress policy.
    StatusRule((ExportRefused,), S.FAILED_PRECONDITION, "export policy refused"),
    StatusRule((PolicyViolation,), S.FAILED_PRECONDITION, "egress policy refused"),
    # A party is not who it claims, or claims a survivor list it cannot prove.
    StatusRule(
        (
            PermissionError,
            InvalidSignature,
            ShareAuthenticationError,
            ConsistencyError,
            InsufficientSignatures,
        ),
        S.PERMISSION_DENIED,
    ),
    # Any other secure-aggregation message that the library rejects.
    StatusRule((SecAggError,), S.INVALID_ARGUMENT),
    # The audit log, called to record this party's egress, refused or failed: not the caller's
    # fault, and nothing was sent.
    StatusRule((RemoteAuditError,), S.UNAVAILABLE, _RECORD_REFUSED),
    # The audit log's own refusals of an Append or a proof request.
    StatusRule((RecordError,), S.INVALID_ARGUMENT, names_field=True),
    StatusRule((SignatureError, UnknownSigner, KeyConflict, NotAParty), S.PERMISSION_DENIED),
    StatusRule((CounterReplay,), S.ALREADY_EXISTS),
    StatusRule((LogRangeError,), S.OUT_OF_RANGE),
    # Egress halted (the log forked) or could not be recorded.
    StatusRule((AuditError,), S.UNAVAILABLE, _RECORD_REFUSED),
)


def status_of(rpc: str, exc: Exception) -> RequestError | None:
    """The status and message `exc` answers in `rpc` (the request message's name), or None
    when no row of `STATUS` covers it."""
    if isinstance(exc, RequestError):
        return exc
    for rule in STATUS:
        if isinstance(exc, rule.errors):
            return RequestError(rule.code, rule.message(rpc, exc))
    return None


@contextmanager
def status_on_error(
    context: grpc.ServicerContext,
    rpc: str,
    refused: Callable[[RequestError], None] | None = None,
) -> Iterator[None]:
    """Aborts the call with the status of an error the body raises (see `status_of`), after
    logging it and calling `refused` (a servicer's metrics) with it."""
    try:
        yield
    except Exception as exc:
        error = status_of(rpc, exc)
        if error is None:
            raise
        log.info("request_refused", rpc=rpc, code=error.code.name, detail=error.message)
        if refused is not None:
            refused(error)
        abort(context, error)
