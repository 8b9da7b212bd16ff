"""gRPC servicer of the boundary agent: validates requests, calls the runtime, audits egress.

Each method is a thin shell: validate the request in one place, turn it into a
runtime call, send the answer through the egress gate (which checks and records it
before it leaves); domain errors become status codes by the one table of
`services.common.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import grpc
import numpy as np
import structlog

from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc
from echelon_proto.common.v1 import common_pb2
from services.common.audited import AuditedPeer
from services.common.errors import status_on_error
from services.common.validate import NonceGuard, require
from services.common.wire import VectorReceiver, iter_chunks, vector_header

from . import metrics
from .runtime import BoundaryRuntime, WindowSpec
from .secure import SecureAggregationSession

log = structlog.get_logger(__name__)
R = TypeVar("R", bound="_Response")
P = common_pb2

COORDINATOR = "coordinator"


class _Response(Protocol):
    @property
    def ref(self) -> common_pb2.WindowRef: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


class _Request(Protocol):
    @property
    def ref(self) -> common_pb2.WindowRef: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


class BoundaryAgentServicer(boundary_pb2_grpc.BoundaryAgentServicer):
    def __init__(
        self,
        runtime: BoundaryRuntime,
        egress: AuditedPeer,
        secure: SecureAggregationSession,
        layout_digest: bytes,
        clock: Callable[[], float] = time.time,
        workers_alive: Callable[[], int] = lambda: 0,
    ) -> None:
        self.runtime = runtime
        self.workers_alive = workers_alive
        self.egress = egress
        self.secure = secure
        self.layout_digest = layout_digest
        self.clock = clock
        self.nonces = NonceGuard()

    def _ref(self, name: str, ref: common_pb2.WindowRef) -> int:
        self.nonces.check(name, ref.window, ref.nonce)
        return int(ref.window)

    def OpenWindow(
        self, request: boundary_pb2.OpenWindowRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.OpenWindowResponse:
        def handle(window: int) -> boundary_pb2.OpenWindowResponse:
            spec = _window_spec(request, self.runtime.boundary, self.clock())
            self.runtime.open_window(spec)
            self.secure.open(request, spec)
            metrics.WINDOW.set(window)
            st = self.runtime.status()
            return boundary_pb2.OpenWindowResponse(
                held_version=max(int(st["held_version"]), 0),
                has_pending_delta=bool(st["has_pending"]),
                pending_base_version=max(int(st["pending_base"]), 0),
                holds_window_version=int(st["held_version"]) == spec.version,
            )

        return self._round(
            context, request, P.PAYLOAD_TYPE_WINDOW_OPEN, P.PAYLOAD_TYPE_WINDOW_ACK, handle
        )

    def DeliverGlobal(
        self,
        request_iterator: Iterator[boundary_pb2.DeliverGlobalRequest],
        context: grpc.ServicerContext,
    ) -> boundary_pb2.DeliverGlobalResponse:
        with status_on_error(context, "DeliverGlobalRequest"):
            first = next(request_iterator, None)
            require(
                first is not None and first.WhichOneof("part") == "header",
                "DeliverGlobalRequest",
                "a stream without a header",
                "a header first",
            )
            assert first is not None
            header = first.header
            window = self._ref("DeliverGlobalRequest.header", header.ref)
            require(
                header.vector.layout_digest == self.layout_digest,
                "GlobalHeader.vector.layout_digest",
                header.vector.layout_digest.hex()[:16],
                self.layout_digest.hex()[:16] + "... (this boundary's adapter layout)",
            )
            receiver = VectorReceiver(header.vector, "GlobalHeader.vector", self.runtime.dim)
            for part in request_iterator:
                require(
                    part.WhichOneof("part") == "chunk",
                    "DeliverGlobalRequest",
                    "a second header",
                    "chunks after the header",
                )
                receiver.add(part.chunk)
            phi = receiver.finish()
            self.egress.received_vector(
                common_pb2.PAYLOAD_TYPE_GLOBAL_ADAPTER, COORDINATOR, window, phi
            )
            self.runtime.install_global(int(header.version), phi, list(header.contributors))
            metrics.VERSION.set(header.version)
            metrics.BYTES_IN.labels("GLOBAL_ADAPTER").inc(header.vector.total_bytes)
            log.info("global_installed", version=header.version, window=window)
            response = boundary_pb2.DeliverGlobalResponse(
                ref=header.ref, held_version=header.version
            )
            return self.egress.reply(
                common_pb2.PAYLOAD_TYPE_WINDOW_ACK, COORDINATOR, window, response
            )
        raise AssertionError("unreachable")

    def _round(
        self,
        context: grpc.ServicerContext,
        request: _Request,
        received: int,
        sent: int,
        handle: Callable[[int], R],
    ) -> R:
        """One unary round: check the reference, audit the request, handle, audit the reply."""
        with status_on_error(context, type(request).__name__):
            window = self._ref(type(request).__name__, request.ref)
            self.egress.received(received, COORDINATOR, window, request)
            response = handle(window)
            response.ref.CopyFrom(request.ref)
            return self.egress.reply(sent, COORDINATOR, window, response)
        raise AssertionError("unreachable: status_on_error aborts")

    def AdvertiseKeys(
        self, request: boundary_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.AdvertiseKeysResponse:
        return self._round(
            context,
            request,
            P.PAYLOAD_TYPE_ROUND_REQUEST,
            P.PAYLOAD_TYPE_KEY_ADVERTISEMENT,
            lambda w: boundary_pb2.AdvertiseKeysResponse(advertisement=self.secure.advertise(w)),
        )

    def ShareKeys(
        self, request: boundary_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.ShareKeysResponse:
        return self._round(
            context,
            request,
            P.PAYLOAD_TYPE_KEY_ADVERTISEMENT,
            P.PAYLOAD_TYPE_ENCRYPTED_SHARES,
            lambda w: boundary_pb2.ShareKeysResponse(
                shares=self.secure.share_keys(w, list(request.advertisements))
            ),
        )

    def DeliverShares(
        self, request: boundary_pb2.DeliverSharesRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.DeliverSharesResponse:
        def handle(window: int) -> boundary_pb2.DeliverSharesResponse:
            self.secure.receive_shares(window, list(request.shares))
            return boundary_pb2.DeliverSharesResponse()

        return self._round(
            context, request, P.PAYLOAD_TYPE_ENCRYPTED_SHARES, P.PAYLOAD_TYPE_WINDOW_ACK, handle
        )

    def CollectDelta(
        self, request: boundary_pb2.CollectDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[boundary_pb2.CollectDeltaResponse]:
        with status_on_error(context, "CollectDeltaRequest"):
            window = self._ref("CollectDeltaRequest", request.ref)
            self.egress.received(
                common_pb2.PAYLOAD_TYPE_ROUND_REQUEST, COORDINATOR, window, request
            )
            contribution = self.runtime.wait_contribution(window, self.clock)
            if contribution is None:
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"window {window}: no delta ready by the deadline; it stays in the boundary",
                )
            assert contribution is not None
            payload_type, vector = self.secure.encode(window, contribution)
            source = contribution.source
            metadata = common_pb2.WindowMetadata(
                tokens=source.tokens,
                staleness=contribution.staleness,
                base_version=source.base_version,
                drift=source.drift,
                delta_norm=contribution.delta_norm,
                train_loss=source.train_loss,
                val_loss=source.val_loss,
                devices=source.devices,
                weight=contribution.weight,
            )
            header = boundary_pb2.DeltaHeader(
                ref=request.ref,
                boundary=self.runtime.boundary,
                party=self.secure.party(window),
                payload_type=common_pb2.PayloadType.ValueType(payload_type),
                vector=vector_header(vector, self.layout_digest),
                metadata=metadata,
            )
            self.egress.sent_delta(
                COORDINATOR, window, header, vector, self.secure.cohort_size(window)
            )
            metrics.BYTES_OUT.labels(common_pb2.PayloadType.Name(header.payload_type)).inc(
                header.vector.total_bytes
            )
            metrics.TOKENS.inc(source.tokens)
            yield boundary_pb2.CollectDeltaResponse(header=header)
            for chunk in iter_chunks(vector):
                yield boundary_pb2.CollectDeltaResponse(chunk=chunk)
            log.info(
                "delta_collected",
                window=window,
                staleness=contribution.staleness,
                bytes=header.vector.total_bytes,
            )

    def ConfirmSurvivors(
        self, request: boundary_pb2.ConfirmSurvivorsRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.ConfirmSurvivorsResponse:
        return self._round(
            context,
            request,
            P.PAYLOAD_TYPE_SURVIVOR_LIST,
            P.PAYLOAD_TYPE_SURVIVOR_SIGNATURE,
            lambda w: boundary_pb2.ConfirmSurvivorsResponse(
                signature=self.secure.sign_survivors(w, list(request.survivors))
            ),
        )

    def Unmask(
        self, request: boundary_pb2.UnmaskRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.UnmaskResponse:
        return self._round(
            context,
            request,
            P.PAYLOAD_TYPE_SURVIVOR_SIGNATURE,
            P.PAYLOAD_TYPE_UNMASKING_SHARES,
            lambda w: self.secure.unmask(w, list(request.survivors), list(request.signatures)),
        )

    def AbortWindow(
        self, request: boundary_pb2.AbortWindowRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.AbortWindowResponse:
        def handle(window: int) -> boundary_pb2.AbortWindowResponse:
            kept = self.runtime.abort_window(window)
            log.info("window_aborted", window=window, reason=request.reason, delta_kept=kept)
            return boundary_pb2.AbortWindowResponse(delta_kept=kept)

        return self._round(
            context, request, P.PAYLOAD_TYPE_WINDOW_ABORT, P.PAYLOAD_TYPE_WINDOW_ACK, handle
        )

    def GetStatus(
        self, request: boundary_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> boundary_pb2.BoundaryStatus:
        st = self.runtime.status()
        return boundary_pb2.BoundaryStatus(
            boundary=self.runtime.boundary,
            held_version=max(int(st["held_version"]), 0),
            window=max(int(st["window"]), 0),
            workers_alive=self.workers_alive(),
            has_pending_delta=bool(st["has_pending"]),
            pending_base_version=max(int(st["pending_base"]), 0),
            tokens_total=int(st["tokens_total"]),
            val_loss=float(st["val_loss"]),
        )


def _window_spec(request: boundary_pb2.OpenWindowRequest, me: str, now: float) -> WindowSpec:
    """Validates an OpenWindowRequest in one place and returns the window's spec."""
    parties = {m.boundary: int(m.party) for m in request.cohort}
    require(
        len(parties) == len(request.cohort) and len(parties) > 0,
        "OpenWindowRequest.cohort",
        [m.boundary for m in request.cohort],
        "a non-empty list of distinct boundaries",
    )
    require(me in parties, "OpenWindowRequest.cohort", sorted(parties), f"a cohort holding {me!r}")
    require(request.inner_steps > 0, "OpenWindowRequest.inner_steps", request.inner_steps, ">= 1")
    deadline = request.deadline_unix_ms / 1000.0
    require(
        deadline > now,
        "OpenWindowRequest.deadline_unix_ms",
        request.deadline_unix_ms,
        f"a time after now ({int(now * 1000)})",
    )
    require(
        np.isfinite(request.inner.lr) and request.inner.lr > 0,
        "OpenWindowRequest.inner.lr",
        request.inner.lr,
        "> 0",
    )
    require(request.inner.mu >= 0, "OpenWindowRequest.inner.mu", request.inner.mu, ">= 0")
    require(request.token_unit > 0, "OpenWindowRequest.token_unit", request.token_unit, "> 0")
    return WindowSpec(
        window=int(request.ref.window),
        version=int(request.version),
        parties=parties,
        deadline_unix_s=deadline,
        inner_steps=int(request.inner_steps),
        lr=float(request.inner.lr),
        mu=float(request.inner.mu),
        token_unit=float(request.token_unit),
    )
