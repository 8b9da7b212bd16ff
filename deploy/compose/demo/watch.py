"""`make demo-docker`'s watcher (compose service demo-watch, on the global network only):
prints a line per committed window from the coordinator's status until the run's windows
are done, then saves the audit log's latest signed tree head and the window count in
OUT (checkpoint.txt, status.json) for the summary. It reads both over mTLS as the demo's
operator, an auditor of the manifest (its kit at /etc/echelon/kit)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from echelon.audit.record import LOG_PARTY
from echelon.trust.kit import Kit, load_kit
from echelon_proto.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from services.audit_log.client import AuditClient
from services.common.tls import secure_channel
from services.common.wire import new_ref
from services.global_coordinator.__main__ import PARTY as COORDINATOR


def status(address: str, kit: Kit) -> coordinator_pb2.CoordinatorStatus | None:
    try:
        with secure_channel(address, kit, COORDINATOR) as channel:
            return coordinator_pb2_grpc.CoordinatorStub(channel).GetStatus(
                coordinator_pb2.GetStatusRequest(ref=new_ref(0)), timeout=5.0
            )
    except grpc.RpcError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coordinator", default="coordinator:50051")
    parser.add_argument("--audit-log", default="audit-log:50052")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kit", type=Path, default=Path("/etc/echelon/kit"))
    args = parser.parse_args(argv)
    kit = load_kit(args.kit)
    started = time.monotonic()
    last = -1
    while True:
        elapsed = time.monotonic() - started
        st = status(args.coordinator, kit)
        if st is not None and st.windows_completed != last:
            last = st.windows_completed
            print(
                f"  [{elapsed:5.0f}s] windows {st.windows_completed:>2} | version "
                f"{st.version:>2} | H {st.inner_steps} | live {len(st.live)} "
                f"({', '.join(sorted(st.live))}) | aborted {st.windows_aborted}",
                flush=True,
            )
        if st is not None and st.windows_completed >= args.windows:
            break
        if elapsed > args.timeout_s:
            print(f"demo-watch: {args.windows} windows not done in {args.timeout_s:.0f}s")
            return 1
        time.sleep(1.0)
    with secure_channel(args.audit_log, kit, LOG_PARTY) as channel:
        checkpoint = AuditClient(channel).tree_head().checkpoint.decode()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint.txt").write_text(checkpoint)
    (args.out / "status.json").write_text(json.dumps({"windows": int(st.windows_completed)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
