"""The AuditLog gRPC servicer: validate the request, call the library, map errors once.

Each method converts the request, calls `TransparencyLog`, and lets `_serve`
turn domain errors into status codes by the one table of `services.common.errors`, so no
handler can map one differently.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import structlog

from echelon.audit import (
    AppendResult,
    LogRangeError,
    SignedTreeHead,
    TransparencyLog,
)
from echelon.audit.record import MAX_RECORD_BYTES, SIGNATURE_BYTES
from echelon.trust.manifest import PartyRole
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from echelon_proto.common.v1 import common_pb2
from services.common.errors import status_on_error
from services.common.transport import Transport
from services.common.validate import NonceGuard, RequestError, require

from .metrics import APPEND_SECONDS, APPENDS, REFUSED, TREE_ENTRIES

T = TypeVar("T")
log = structlog.get_logger(__name__)
MAX_ENTRIES_PER_CALL = 1000


def _tree_head(head: SignedTreeHead) -> audit_pb2.SignedTreeHead:
    return audit_pb2.SignedTreeHead(
        tree_size=head.size, root_hash=head.root_hash, checkpoint=head.checkpoint
    )


def validate_append(request: audit_pb2.AppendRequest, what: str = "AppendRequest") -> None:
    """The request's shape (`what` names it in errors); the record's content is validated
    by `AuditRecord.decode`."""
    size = len(request.record)
    require(
        0 < size <= MAX_RECORD_BYTES,
        f"{what}.record",
        f"{size} bytes",
        f"1..{MAX_RECORD_BYTES} bytes",
    )
    signature = len(request.signature)
    require(
        signature == SIGNATURE_BYTES,
        f"{what}.signature",
        f"{signature} bytes",
        f"{SIGNATURE_BYTES} bytes",
    )


# Who may call: parties that append (their own records only), and every manifest party,
# auditors included, for reads (entries, proofs, heads).
APPENDERS = (PartyRole.BOUNDARY, PartyRole.COORDINATOR)


class AuditLogServicer(audit_pb2_grpc.AuditLogServicer):
    """Serves one `TransparencyLog`; with mTLS, every call is authorized by its peer."""

    def __init__(
        self, log: TransparencyLog, nonces: NonceGuard, transport: Transport | None = None
    ) -> None:
        self._log = log
        self._nonces = nonces
        self._transport = transport or Transport(kit=None)
        TREE_ENTRIES.set(log.size)

    def _caller(self, context: grpc.ServicerContext, *, append: bool = False) -> str | None:
        """The calling party's id (None on plaintext); others end the call."""
        party = self._transport.authorize(context, APPENDERS if append else None)
        return None if party is None else party.party_id

    def _serve(self, context: grpc.ServicerContext, message: str, call: Callable[[], T]) -> T:
        def refused(error: RequestError) -> None:
            rpc = re.split(r"[.\[]", message)[0].removesuffix("Request")  # one label per RPC
            REFUSED.labels(rpc=rpc, code=error.code.name).inc()

        with status_on_error(context, message, refused):
            return call()
        raise AssertionError("unreachable: status_on_error aborts")

    def _ref(self, message: str, ref: common_pb2.WindowRef, present: bool) -> None:
        require(present, f"{message}.ref", "absent", "a WindowRef")
        self._nonces.check(message, ref.window, bytes(ref.nonce))

    def Append(
        self, request: audit_pb2.AppendRequest, context: grpc.ServicerContext
    ) -> audit_pb2.AppendResponse:
        """`tree_head` is the latest signed head, which covers the record only when its
        size exceeds `index` (heads are signed lazily); GetTreeHead returns one that does."""

        caller = self._caller(context, append=True)

        def append() -> audit_pb2.AppendResponse:
            self._ref("AppendRequest", request.ref, request.HasField("ref"))
            response = self._append(request, "AppendRequest", caller)
            if request.prove:
                self._prove(response, int(request.known_size))
            return response

        return self._serve(context, "AppendRequest", append)

    def AppendStream(
        self, request_iterator: Iterator[audit_pb2.AppendRequest], context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.AppendResponse]:
        """Appends each request in order and answers it; the first refused one ends the
        stream with its status, naming its position."""
        caller = self._caller(context, append=True)
        proven: int | None = None  # the size of the head this stream's last proof ended at
        for i, request in enumerate(request_iterator):
            what = f"AppendRequest[{i}]"  # its position on the stream, in errors

            start = int(request.known_size) if proven is None else proven

            def append(
                request: audit_pb2.AppendRequest = request, what: str = what, start: int = start
            ) -> audit_pb2.AppendResponse:
                self._ref(what, request.ref, request.HasField("ref"))
                response = self._append(request, what, caller)
                if request.prove:
                    self._prove(response, start)
                return response

            response = self._serve(context, what, append)
            if request.prove:
                proven = response.tree_head.tree_size
            yield response

    def _append(
        self, request: audit_pb2.AppendRequest, what: str, caller: str | None
    ) -> audit_pb2.AppendResponse:
        started = time.perf_counter()
        validate_append(request, what)
        result = self._log.append(bytes(request.record), bytes(request.signature), caller)
        assert result.tree_head is not None, "the log itself always answers with a head"
        self._observe(result, time.perf_counter() - started)
        return audit_pb2.AppendResponse(
            index=result.index, leaf_hash=result.leaf_hash, tree_head=_tree_head(result.tree_head)
        )

    def _prove(self, response: audit_pb2.AppendResponse, known_size: int) -> None:
        """Adds a head signed now (it covers the record), the record's inclusion proof under
        it and the head's consistency with the sender's `known_size`."""
        head = self._log.proof_head()
        require(
            known_size <= head.size,
            "AppendRequest.known_size",
            known_size,
            f"<= {head.size}, the log's size (a larger size is a head this log never had)",
        )
        response.tree_head.CopyFrom(_tree_head(head))
        response.inclusion_proof.extend(self._log.inclusion_proof(response.index, head.size))
        if known_size:
            response.consistency_proof.extend(self._log.consistency_proof(known_size, head.size))
        response.consistency_from = known_size

    def _observe(self, result: AppendResult, seconds: float) -> None:
        record = result.record
        assert record is not None, "TransparencyLog.append returns the decoded record"
        verdict = "accepted" if record.verdict.accepted else "refused"
        APPENDS.labels(payload_type=record.payload_type.name, verdict=verdict).inc()
        APPEND_SECONDS.observe(seconds)
        TREE_ENTRIES.set(self._log.size)
        log.info(
            "record_appended",
            index=result.index,
            signer=record.signer,
            payload_type=record.payload_type.name,
            window=record.window,
            verdict=verdict,
        )

    def GetTreeHead(
        self, request: audit_pb2.GetTreeHeadRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetTreeHeadResponse:
        self._caller(context)

        def head() -> audit_pb2.GetTreeHeadResponse:
            self._ref("GetTreeHeadRequest", request.ref, request.HasField("ref"))
            return audit_pb2.GetTreeHeadResponse(tree_head=_tree_head(self._log.tree_head()))

        return self._serve(context, "GetTreeHeadRequest", head)

    def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        self._caller(context)

        def proof() -> audit_pb2.GetInclusionProofResponse:
            self._ref("GetInclusionProofRequest", request.ref, request.HasField("ref"))
            hashes = self._log.inclusion_proof(request.index, request.tree_size)
            return audit_pb2.GetInclusionProofResponse(
                index=request.index, tree_size=request.tree_size, hashes=hashes
            )

        return self._serve(context, "GetInclusionProofRequest", proof)

    def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetConsistencyProofResponse:
        self._caller(context)

        def proof() -> audit_pb2.GetConsistencyProofResponse:
            self._ref("GetConsistencyProofRequest", request.ref, request.HasField("ref"))
            hashes = self._log.consistency_proof(request.first, request.second)
            return audit_pb2.GetConsistencyProofResponse(
                first=request.first, second=request.second, hashes=hashes
            )

        return self._serve(context, "GetConsistencyProofRequest", proof)

    def GetEntries(
        self, request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.Entry]:
        self._caller(context)

        def entries() -> list[audit_pb2.Entry]:
            self._ref("GetEntriesRequest", request.ref, request.HasField("ref"))
            size = self._log.size
            if request.start >= size:
                raise LogRangeError(f"start: got {request.start}, want < {size} (the log size)")
            require(
                request.end > request.start,
                "GetEntriesRequest.end",
                request.end,
                f"> start {request.start}",
            )
            end = min(request.end, size, request.start + MAX_ENTRIES_PER_CALL)
            return [
                audit_pb2.Entry(index=e.index, record=e.record, signature=e.signature)
                for e in self._log.entries(request.start, end)
            ]

        yield from self._serve(context, "GetEntriesRequest", entries)
