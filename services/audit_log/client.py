"""The audit log client: every call with a deadline, gRPC status mapped to domain errors once.

`AuditClient` is the egress gate's sink (`append`) and the witness's source of
consistency proofs (`consistency_proof`).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from echelon.audit import (
    AppendRefused,
    AppendResult,
    AuditError,
    CounterReplay,
    LogRangeError,
    RecordError,
    SignedTreeHead,
    StoredEntry,
)
from echelon.audit.errors import VerificationError
from echelon.audit.merkle import leaf_hash
from echelon.audit.proofs import AppendProof, MissingProof, ProofChain
from echelon.audit.record import leaf_data
from echelon_proto.audit.v1 import audit_pb2, audit_pb2_grpc
from services.common.wire import new_ref

T = TypeVar("T")


class RemoteAuditError(AuditError):
    """Raised by `AuditClient`: the audit log service refused or failed a call. The caller's
    request is not at fault, so a servicer that meets one while recording its egress answers
    UNAVAILABLE (`services.common.errors`); the subclasses keep the library's error types."""


class AuditServiceError(RemoteAuditError):
    """The service failed or refused in a way no narrower domain error describes."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code


class InvalidRecord(RecordError, RemoteAuditError):
    """The service refused the request as malformed (INVALID_ARGUMENT)."""

    def __init__(self, detail: str) -> None:
        super().__init__("request", expected="a well-formed request", found=detail)


class RemoteAppendRefused(AppendRefused, RemoteAuditError):
    """The service refused the append (PERMISSION_DENIED: signature, registration)."""


class RemoteCounterReplay(CounterReplay, RemoteAuditError):
    """The service refused a record counter it has seen (ALREADY_EXISTS)."""


class RemoteLogRangeError(LogRangeError, RemoteAuditError):
    """The service has no such entry or tree size (OUT_OF_RANGE)."""


def _raise(error: grpc.RpcError) -> NoReturn:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    detail = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise TimeoutError(f"audit log: {detail}") from error
    if code == grpc.StatusCode.UNAVAILABLE:
        raise ConnectionError(f"audit log unavailable: {detail}") from error
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise InvalidRecord(detail) from error
    if code == grpc.StatusCode.PERMISSION_DENIED:
        raise RemoteAppendRefused(detail) from error
    if code == grpc.StatusCode.ALREADY_EXISTS:
        raise RemoteCounterReplay(detail, expected="a fresh counter", found=detail) from error
    if code == grpc.StatusCode.OUT_OF_RANGE:
        raise RemoteLogRangeError(detail) from error
    raise AuditServiceError(code, detail) from error


def _tree_head(head: audit_pb2.SignedTreeHead) -> SignedTreeHead:
    return SignedTreeHead(
        size=head.tree_size, root_hash=bytes(head.root_hash), checkpoint=bytes(head.checkpoint)
    )


class AuditClient:
    """Calls one audit log service over `channel`; every call has a `timeout_s` deadline."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout_s: float = 10.0,
        proofs: ProofChain | None = None,
    ) -> None:
        """`proofs`: ask the log to prove every append in its answer and check it there
        (an answer that does not prove its record raises VerificationError)."""
        if timeout_s <= 0:
            raise ValueError(f"AuditClient.timeout_s: got {timeout_s}, want > 0")
        self._stub = audit_pb2_grpc.AuditLogStub(channel)
        self._timeout_s = timeout_s
        self.proofs = proofs
        self.on_proof_failure: Callable[[str], None] = lambda reason: None

    def _request(self, record: bytes, signature: bytes, window: int) -> audit_pb2.AppendRequest:
        chain = self.proofs
        return audit_pb2.AppendRequest(
            ref=new_ref(window),
            record=record,
            signature=signature,
            prove=chain is not None,
            known_size=0 if chain is None else chain.known_size,
        )

    def _result(self, response: audit_pb2.AppendResponse, sent: bytes) -> AppendResult:
        """The answer, its proof checked first when this client asks for proofs: the proof
        must be of `sent`, the leaf hash of the record this client sent (not of whatever
        entry the log names). A failed proof calls `on_proof_failure` (the party halts)."""
        if self.proofs is not None:
            try:
                if bytes(response.leaf_hash) != sent:
                    raise MissingProof(
                        f"answer for record at index {response.index}",
                        expected=f"the leaf hash of the record sent, {sent.hex()[:16]}...",
                        found=bytes(response.leaf_hash).hex()[:16] + "...",
                    )
                self.proofs.check(
                    AppendProof(
                        index=response.index,
                        leaf_hash=sent,
                        checkpoint=bytes(response.tree_head.checkpoint),
                        inclusion=tuple(bytes(h) for h in response.inclusion_proof),
                        consistency=tuple(bytes(h) for h in response.consistency_proof),
                        consistency_from=response.consistency_from,
                    )
                )
            except VerificationError as exc:
                self.on_proof_failure(f"the audit log did not prove a record: {exc}")
                raise
        return AppendResult(
            index=response.index,
            leaf_hash=bytes(response.leaf_hash),
            tree_head=_tree_head(response.tree_head),
        )

    def _call(self, rpc: Callable[[], T]) -> T:
        try:
            return rpc()
        except grpc.RpcError as error:
            _raise(error)

    def append(self, record: bytes, signature: bytes, *, window: int = 0) -> AppendResult:
        """Appends a signed record.

        Raises InvalidRecord (malformed), AppendRefused (signature, registration),
        CounterReplay, TimeoutError, ConnectionError or AuditServiceError.
        """
        request = self._request(record, signature, window)
        response = self._call(lambda: self._stub.Append(request, timeout=self._timeout_s))
        return self._result(response, leaf_hash(leaf_data(record, signature)))

    def append_stream(self, records: Iterator[tuple[bytes, bytes]]) -> Iterator[AppendResult]:
        """Appends each (record, signature) that `records` yields, in order, over one
        stream (no deadline: it lives as long as the party), yielding each result in the
        same order. Raises as `append` does for the first refused record, which ends the
        stream (the ones before it stay appended)."""
        sent: collections.deque[bytes] = collections.deque()  # leaf hashes, in order

        def requests() -> Iterator[audit_pb2.AppendRequest]:
            for record, signature in records:
                sent.append(leaf_hash(leaf_data(record, signature)))
                yield self._request(record, signature, 0)

        try:
            for response in self._stub.AppendStream(requests()):
                if not sent:
                    raise MissingProof(
                        "append stream", expected="one answer per record", found="an extra one"
                    )
                yield self._result(response, sent.popleft())
        except grpc.RpcError as error:
            _raise(error)

    def tree_head(self) -> SignedTreeHead:
        request = audit_pb2.GetTreeHeadRequest(ref=new_ref(0))
        response = self._call(lambda: self._stub.GetTreeHead(request, timeout=self._timeout_s))
        return _tree_head(response.tree_head)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Raises LogRangeError when index >= tree_size or tree_size exceeds the log."""
        request = audit_pb2.GetInclusionProofRequest(
            ref=new_ref(0), index=index, tree_size=tree_size
        )
        response = self._call(
            lambda: self._stub.GetInclusionProof(request, timeout=self._timeout_s)
        )
        return [bytes(h) for h in response.hashes]

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """Raises LogRangeError when first > second or second exceeds the log."""
        request = audit_pb2.GetConsistencyProofRequest(ref=new_ref(0), first=first, second=second)
        response = self._call(
            lambda: self._stub.GetConsistencyProof(request, timeout=self._timeout_s)
        )
        return [bytes(h) for h in response.hashes]

    def _page(self, start: int, end: int) -> list[audit_pb2.Entry]:
        request = audit_pb2.GetEntriesRequest(ref=new_ref(0), start=start, end=end)
        return list(self._stub.GetEntries(request, timeout=self._timeout_s))

    def entries(self, start: int, end: int) -> Iterator[StoredEntry]:
        """Yields entries [start, end), paging by 1000. Raises LogRangeError past the log."""
        while start < end:
            page = self._call(functools.partial(self._page, start, end))
            if not page:
                return
            for entry in page:
                yield StoredEntry(
                    index=entry.index,
                    record=bytes(entry.record),
                    signature=bytes(entry.signature),
                    leaf_hash=leaf_hash(leaf_data(entry.record, entry.signature)),
                )
            start = page[-1].index + 1
