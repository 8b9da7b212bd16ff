"""Client of one boundary agent: every call has a deadline, is audited in both directions,
and maps gRPC status to domain exceptions once (`AgentCallError`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc
from echelon_proto.common.v1 import common_pb2
from services.common.audited import AuditedPeer, _Message
from services.common.validate import RequestError
from services.common.wire import VectorReceiver, iter_chunks, new_ref

P = common_pb2


class AgentCallError(Exception):
    """A call to a boundary agent failed; `code` is the gRPC status (None: bad reply)."""

    def __init__(self, boundary: str, method: str, code: grpc.StatusCode | None, detail: str):
        super().__init__(f"{boundary}.{method}: {code.name if code else 'BAD_REPLY'}: {detail}")
        self.boundary = boundary
        self.method = method
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CollectedDelta:
    header: boundary_pb2.DeltaHeader
    vector: np.ndarray


class AgentClient:
    """Calls one boundary agent on behalf of the coordinator."""

    def __init__(self, boundary: str, address: str, audit: AuditedPeer, timeout_s: float) -> None:
        self.boundary = boundary
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = boundary_pb2_grpc.BoundaryAgentStub(self._channel)
        self._audit = audit
        self._timeout_s = timeout_s
        self._active: grpc.Call | None = None

    def cancel_collect(self) -> None:
        """Cancels an in-flight CollectDelta (the window closed without it)."""
        active = self._active
        if active is not None:
            active.cancel()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def _unary(
        self,
        method: str,
        sent_type: int,
        got_type: int,
        window: int,
        request: _Message,
        timeout_s: float | None = None,
    ) -> object:
        call = getattr(self._stub, method)
        self._audit.sent(sent_type, self.boundary, window, request)
        try:
            response = call(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise AgentCallError(self.boundary, method, exc.code(), exc.details() or "") from exc
        self._audit.received(got_type, self.boundary, window, response)
        return response

    def open_window(
        self, request: boundary_pb2.OpenWindowRequest
    ) -> boundary_pb2.OpenWindowResponse:
        response = self._unary(
            "OpenWindow",
            P.PAYLOAD_TYPE_WINDOW_OPEN,
            P.PAYLOAD_TYPE_WINDOW_ACK,
            request.ref.window,
            request,
        )
        assert isinstance(response, boundary_pb2.OpenWindowResponse)
        return response

    def deliver_global(
        self,
        window: int,
        version: int,
        phi: np.ndarray,
        described: common_pb2.VectorHeader,
        contributors: list[str],
    ) -> None:
        """Streams version `phi`; `described` is its `vector_header`, built once per version."""
        header = boundary_pb2.GlobalHeader(
            ref=new_ref(window), version=version, vector=described, contributors=contributors
        )

        def stream() -> Iterator[boundary_pb2.DeliverGlobalRequest]:
            yield boundary_pb2.DeliverGlobalRequest(header=header)
            for chunk in iter_chunks(phi):
                yield boundary_pb2.DeliverGlobalRequest(chunk=chunk)

        self._audit.sent_vector(P.PAYLOAD_TYPE_GLOBAL_ADAPTER, self.boundary, window, phi)
        try:
            response = self._stub.DeliverGlobal(stream(), timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise AgentCallError(
                self.boundary, "DeliverGlobal", exc.code(), exc.details() or ""
            ) from exc
        self._audit.received(P.PAYLOAD_TYPE_WINDOW_ACK, self.boundary, window, response)

    def advertise_keys(self, window: int) -> boundary_pb2.KeyAdvertisement:
        request = boundary_pb2.AdvertiseKeysRequest(ref=new_ref(window))
        response = self._unary(
            "AdvertiseKeys",
            P.PAYLOAD_TYPE_ROUND_REQUEST,
            P.PAYLOAD_TYPE_KEY_ADVERTISEMENT,
            window,
            request,
        )
        assert isinstance(response, boundary_pb2.AdvertiseKeysResponse)
        return response.advertisement

    def share_keys(
        self, window: int, ads: list[boundary_pb2.KeyAdvertisement]
    ) -> list[boundary_pb2.EncryptedShare]:
        request = boundary_pb2.ShareKeysRequest(ref=new_ref(window), advertisements=ads)
        response = self._unary(
            "ShareKeys",
            P.PAYLOAD_TYPE_KEY_ADVERTISEMENT,
            P.PAYLOAD_TYPE_ENCRYPTED_SHARES,
            window,
            request,
        )
        assert isinstance(response, boundary_pb2.ShareKeysResponse)
        return list(response.shares)

    def deliver_shares(self, window: int, shares: list[boundary_pb2.EncryptedShare]) -> None:
        request = boundary_pb2.DeliverSharesRequest(ref=new_ref(window), shares=shares)
        self._unary(
            "DeliverShares",
            P.PAYLOAD_TYPE_ENCRYPTED_SHARES,
            P.PAYLOAD_TYPE_WINDOW_ACK,
            window,
            request,
        )

    def collect_delta(
        self, window: int, dim: int, cohort_size: int, timeout_s: float
    ) -> CollectedDelta:
        """Streams the boundary's contribution; checks length and digest before returning."""
        request = boundary_pb2.CollectDeltaRequest(ref=new_ref(window))
        self._audit.sent(P.PAYLOAD_TYPE_ROUND_REQUEST, self.boundary, window, request)
        try:
            stream = self._stub.CollectDelta(request, timeout=timeout_s)
            self._active = stream
            first = next(iter(stream))
            if first.WhichOneof("part") != "header":
                raise AgentCallError(self.boundary, "CollectDelta", None, "stream without header")
            header = first.header
            receiver = VectorReceiver(header.vector, "DeltaHeader.vector", dim + 1)
            for part in stream:
                if part.WhichOneof("part") != "chunk":
                    raise AgentCallError(self.boundary, "CollectDelta", None, "second header")
                receiver.add(part.chunk)
            vector = receiver.finish()
        except grpc.RpcError as exc:
            raise AgentCallError(
                self.boundary, "CollectDelta", exc.code(), exc.details() or ""
            ) from exc
        except StopIteration as exc:
            raise AgentCallError(self.boundary, "CollectDelta", None, "empty stream") from exc
        except RequestError as exc:
            raise AgentCallError(self.boundary, "CollectDelta", None, exc.message) from exc
        self._audit.received_delta(self.boundary, window, header, vector, cohort_size)
        return CollectedDelta(header=header, vector=vector)

    def confirm_survivors(
        self, window: int, survivors: list[int]
    ) -> boundary_pb2.SurvivorSignature:
        request = boundary_pb2.ConfirmSurvivorsRequest(ref=new_ref(window), survivors=survivors)
        response = self._unary(
            "ConfirmSurvivors",
            P.PAYLOAD_TYPE_SURVIVOR_LIST,
            P.PAYLOAD_TYPE_SURVIVOR_SIGNATURE,
            window,
            request,
        )
        assert isinstance(response, boundary_pb2.ConfirmSurvivorsResponse)
        return response.signature

    def unmask(
        self, window: int, survivors: list[int], signatures: list[boundary_pb2.SurvivorSignature]
    ) -> boundary_pb2.UnmaskResponse:
        request = boundary_pb2.UnmaskRequest(
            ref=new_ref(window), survivors=survivors, signatures=signatures
        )
        response = self._unary(
            "Unmask",
            P.PAYLOAD_TYPE_SURVIVOR_SIGNATURE,
            P.PAYLOAD_TYPE_UNMASKING_SHARES,
            window,
            request,
        )
        assert isinstance(response, boundary_pb2.UnmaskResponse)
        return response

    def abort_window(self, window: int, reason: str) -> bool:
        request = boundary_pb2.AbortWindowRequest(ref=new_ref(window), reason=reason)
        response = self._unary(
            "AbortWindow", P.PAYLOAD_TYPE_WINDOW_ABORT, P.PAYLOAD_TYPE_WINDOW_ACK, window, request
        )
        assert isinstance(response, boundary_pb2.AbortWindowResponse)
        return bool(response.delta_kept)
