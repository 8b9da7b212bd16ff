"""echelon-healthcheck: asks a service's standard gRPC health service (grpc.health.v1)
whether it is SERVING; exits 0 if it is, 1 if not or unreachable. The image's HEALTHCHECK
runs it against the service's plaintext health-only port ([service].health_port, which
the image sets to 8081), so it needs no client certificate once the services use mTLS.

    echelon-healthcheck [ADDRESS] [--service NAME]

ADDRESS defaults to 127.0.0.1:$ECHELON_HEALTH_PORT. NAME is a health service name: ""
(the server as a whole, the default) or, for an agent, echelon.boundary.v1.Attached
(SERVING only while its session with the coordinator is up).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("ECHELON_HEALTH_PORT", "8081")
    parser = argparse.ArgumentParser(prog="echelon-healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", default=f"127.0.0.1:{port}")
    parser.add_argument("--service", default="", help="health service name ('' = the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    what = f"{args.address} {args.service or '(server)'}"
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"{what}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"{what}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
