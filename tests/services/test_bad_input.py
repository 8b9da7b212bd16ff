"""Bad input to a boundary agent mid-window gets a clear status, and the window's result is
unchanged: replayed requests, calls for another window, duplicate collection, a share that
fails authentication, an unmasking request that names a live participant as dropped, and a
global adapter stream of the wrong length or digest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from echelon_proto.boundary.v1 import boundary_pb2
from services.common.wire import iter_chunks, new_ref, vector_header
from services.global_coordinator.agents import AgentCallError, AgentClient

from .harness import DIM, Sites, expected_phi

ORGS = ["org-a", "org-b", "org-c"]


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path, ORGS)
    yield s
    s.close()


def _code(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except AgentCallError as exc:
        return exc.code
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_bad_input_mid_window_is_refused_and_the_result_is_unchanged(sites: Sites) -> None:
    a = sites.agents["org-a"]
    client: AgentClient = sites.driver._client("org-a", a.address)
    seen: dict[str, grpc.StatusCode | None] = {}
    real_open, real_deliver = client.open_window, client.deliver_shares
    real_collect, real_unmask = client.collect_delta, client.unmask

    def open_window(request: boundary_pb2.OpenWindowRequest) -> Any:
        response = real_open(request)
        seen["replayed OpenWindow"] = _code(lambda: real_open(request))
        return response

    def deliver_shares(window: int, shares: list[boundary_pb2.EncryptedShare]) -> None:
        tampered = [boundary_pb2.EncryptedShare() for _ in shares]
        for bad, good in zip(tampered, shares, strict=True):
            bad.CopyFrom(good)
            raw = bytearray(good.encoded)
            raw[-1] ^= 0x01
            bad.encoded = bytes(raw)
        seen["tampered share"] = _code(lambda: real_deliver(window, tampered))
        seen["shares for another window"] = _code(lambda: real_deliver(window + 1, shares))
        real_deliver(window, shares)

    def collect_delta(window: int, dim: int, cohort: int, timeout_s: float) -> Any:
        seen["collect for an earlier window"] = _code(
            lambda: real_collect(window - 1, dim, cohort, timeout_s)
        )
        got = real_collect(window, dim, cohort, timeout_s)
        seen["duplicate collect"] = _code(lambda: real_collect(window, dim, cohort, timeout_s))
        return got

    def unmask(window: int, survivors: list[int], signatures: Any) -> Any:
        named_dropped = [p for p in survivors if p != survivors[-1]]
        seen["live party named dropped"] = _code(
            lambda: real_unmask(window, named_dropped, signatures)
        )
        return real_unmask(window, survivors, signatures)

    client.open_window = open_window  # type: ignore[method-assign]
    client.deliver_shares = deliver_shares  # type: ignore[method-assign]
    client.collect_delta = collect_delta  # type: ignore[method-assign]
    client.unmask = unmask  # type: ignore[method-assign]

    sites.heartbeat_all()
    outcome = sites.driver.step()

    assert seen == {
        "replayed OpenWindow": grpc.StatusCode.ALREADY_EXISTS,
        "tampered share": grpc.StatusCode.PERMISSION_DENIED,
        "shares for another window": grpc.StatusCode.FAILED_PRECONDITION,
        "collect for an earlier window": grpc.StatusCode.FAILED_PRECONDITION,
        "duplicate collect": grpc.StatusCode.FAILED_PRECONDITION,
        "live party named dropped": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert outcome is not None and outcome.committed, outcome
    phi = sites.store.load_adapter(outcome.version)
    np.testing.assert_allclose(phi, expected_phi(ORGS), atol=1e-4)


def _deliver(stub: Any, header: boundary_pb2.GlobalHeader, vector: np.ndarray) -> None:
    def stream() -> Iterator[boundary_pb2.DeliverGlobalRequest]:
        yield boundary_pb2.DeliverGlobalRequest(header=header)
        for chunk in iter_chunks(vector):
            yield boundary_pb2.DeliverGlobalRequest(chunk=chunk)

    stub.DeliverGlobal(stream(), timeout=5)


def test_global_adapter_of_wrong_length_or_digest_is_refused(sites: Sites) -> None:
    stub = sites.agents["org-a"].stub()
    good = np.ones(DIM, dtype=np.float32)
    short = np.ones(DIM - 1, dtype=np.float32)
    header = boundary_pb2.GlobalHeader(
        ref=new_ref(1), version=1, vector=vector_header(short, b"\x01" * 32)
    )
    with pytest.raises(grpc.RpcError) as err:
        _deliver(stub, header, short)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "length: got 999, want 1000" in (err.value.details() or "")

    header = boundary_pb2.GlobalHeader(
        ref=new_ref(1), version=1, vector=vector_header(good, b"\x01" * 32)
    )
    with pytest.raises(grpc.RpcError) as err:
        _deliver(stub, header, good * 2)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert sites.agents["org-a"].runtime.held_version == -1  # nothing installed

    header = boundary_pb2.GlobalHeader(
        ref=new_ref(1), version=1, vector=vector_header(good, b"\x09" * 32)
    )
    with pytest.raises(grpc.RpcError) as err:
        _deliver(stub, header, good)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layout_digest" in (err.value.details() or "")
