"""`echelon demo` (`make demo`): two organizations adapt one LoRA adapter on loopback.

Each organization gets a different domain of real text (Debian packages fetched
at set-up, or standard-library docstrings without a registry), a boundary agent
and two device workers; a coordinator and an audit log complete the system. The
demo shows progress per window, then stops every process, verifies the audit log,
evaluates each organization's held-out loss before and after, exports the final
global adapter as a peft directory and generates a few tokens from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from echelon.audit.record import Direction
from echelon.audit.store import read_records
from echelon_proto.boundary.v1 import boundary_pb2, boundary_pb2_grpc
from echelon_proto.coordinator.v1 import coordinator_pb2
from echelon_tools.launcher import Deployment, DeploymentSpec, LaunchError, Site
from services.audit_log.client import AuditClient
from services.common.wire import new_ref

ORGS = (("org-a", "scripture"), ("org-b", "python-docs"))
TOKENIZER_DOMAINS = ("stdlib-c", "stdlib-d")  # public text, the same for every organization


@dataclass(frozen=True)
class Summary:
    windows: int
    tokens: int
    bytes_by_type: dict[str, int]
    audit_entries: int
    tree_head: str
    verify: str
    losses: dict[str, tuple[float, float]]
    sample: str


def _corpus(cache: Path, max_bytes: int) -> dict[str, Path]:
    from echelon_tools.corpus import fetch_domain

    paths = {}
    for org, domain in ORGS:
        got = fetch_domain(domain, cache, max_bytes=max_bytes)
        print(f"  {org}: {got.domain} ({got.source}, {got.path.stat().st_size // 1024} KiB)")
        paths[org] = got.path
    for domain in TOKENIZER_DOMAINS:
        paths[domain] = fetch_domain(domain, cache, max_bytes=max_bytes).path
    return paths


def _base_model(args: argparse.Namespace, paths: dict[str, Path]) -> Path:
    """Pretrains (once, cached) the tiny Llama on public text: the model every org adapts."""
    from echelon.training.model_config import ModelConfig
    from echelon.training.pretrain import PretrainConfig, pretrain_base
    from echelon.training.tokenizer import TokenizerConfig

    files = tuple(paths[d].resolve() for d in TOKENIZER_DOMAINS)
    out: Path = (args.cache / f"base-model-{args.pretrain_steps}").resolve()
    started = time.monotonic()
    pretrain_base(
        files,
        out,
        ModelConfig(),
        TokenizerConfig(files=files, vocab_size=4096),
        PretrainConfig(steps=args.pretrain_steps, seq_len=args.seq_len),
    )
    print(f"  {_shown(out)} ({time.monotonic() - started:.0f}s; cached for the next run)")
    return out


def _shown(path: Path) -> str:
    """A path as a person would type it here: relative to the working directory if inside."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _spec(args: argparse.Namespace, paths: dict[str, Path], base: Path) -> DeploymentSpec:
    seq = args.seq_len
    return DeploymentSpec(
        root=args.root,
        mtls=not args.insecure,
        sites=tuple(
            Site(
                boundary=org,
                data_files=(paths[org],),
                workers=args.workers,
                wan_delay_s=args.wan_ms / 1000.0,
            )
            for org, _ in ORGS
        ),
        tokenizer_files=tuple(paths[d] for d in TOKENIZER_DOMAINS),
        coordinator_tables={
            "coordinator": {"run_id": "demo", "windows": args.windows, "token_unit": 8192.0},
            "window": {"inner_steps": args.steps, "deadline_s": 300.0},
            "inner": {"lr": args.lr, "batch_size": args.batch_size, "seq_len": seq},
            "outer": {"lr": 0.7, "momentum": 0.9},
            "secagg": {"level1": not args.no_secagg, "level2": not args.no_secagg},
        },
        agent_tables={
            "data": {"seq_len": seq, "max_tokens_per_file": args.max_tokens},
            "tokenizer": {"model_dir": str(base)},
            "model": {"source": str(base)},
            "inner": {
                "batch_size": args.batch_size,
                "seq_len": seq,
                "warmup_steps": 5,
                "total_steps": max(args.windows * args.steps, 10) + 5,
            },
            "devices": {"eval_batches": 8},
        },
        log_level="info",
    )


def _agent_status(address: str) -> boundary_pb2.BoundaryStatus | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return boundary_pb2_grpc.BoundaryAgentStub(channel).GetStatus(
                boundary_pb2.GetStatusRequest(ref=new_ref(0)), timeout=2.0
            )
    except grpc.RpcError:
        return None


class Progress:
    """Prints one line per committed window and a live status line in between."""

    def __init__(self, deployment: Deployment, started: float) -> None:
        self.deployment = deployment
        self.started = started
        self.last = -1

    def __call__(self, status: coordinator_pb2.CoordinatorStatus) -> None:
        elapsed = time.monotonic() - self.started
        if status.windows_completed == self.last:
            if sys.stdout.isatty():
                print(f"\r  window {status.window} running ... {elapsed:5.0f}s", end="", flush=True)
            return
        self.last = status.windows_completed
        parts = []
        tokens = 0
        for org, _ in ORGS:
            st = _agent_status(self.deployment.services[org].address)
            if st is not None:
                tokens += st.tokens_total
                parts.append(f"{org} local val {st.val_loss:6.3f}")
        print(
            f"\r  [{elapsed:5.0f}s] windows {status.windows_completed:>2} | version "
            f"{status.version:>2} | H {status.inner_steps} | live {len(status.live)} | "
            f"tokens {tokens:>8,} | " + " | ".join(parts),
            flush=True,
        )


def _audit_bytes(db: Path) -> tuple[dict[str, int], int]:
    records = read_records(db)
    sent: Counter[str] = Counter()
    for record in records:
        if (
            record.direction == Direction.SENT
            and record.verdict.accepted
            and record.receiver != "audit-log"
        ):
            sent[record.payload_type.name] += record.payload_size
    return dict(sent), len(records)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echelon demo", description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="corpus cache")
    parser.add_argument("--root", type=Path, default=Path("var/demo"), help="run directory")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="inner steps H per window")
    parser.add_argument("--workers", type=int, default=2, help="devices per organization")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-tokens", type=int, default=400_000, help="tokens per org file")
    parser.add_argument("--no-secagg", action="store_true", help="baseline: both levels off")
    parser.add_argument(
        "--wan-ms",
        type=float,
        default=0.0,
        help="one-way WAN delay between each organization and the global plane",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=300,
        help="steps of base-model pretraining on public text (cached)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no federation kits (the audit log and its verdict say so)",
    )
    # Set by `make demo-netns` (echelon_tools.netns), which runs this inside ech-global.
    parser.add_argument("--netns", metavar="PREFIX", help=argparse.SUPPRESS)
    parser.add_argument("--loss", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    net = None
    if args.netns is not None:
        from echelon_tools.netns import GlobalPlane

        orgs = tuple(org for org, _ in ORGS)
        net = GlobalPlane.inside(orgs, args.wan_ms, args.loss, args.netns)
    where = net.where if net is not None else "loopback"
    print(f"Echelon demo: 2 organizations x 2 devices, coordinator, audit log ({where})")
    print("corpus:")
    paths = _corpus(args.cache / "corpus", 4 << 20)
    print("base model: a tiny Llama pretrained on public text (Python stdlib docstrings):")
    base = _base_model(args, paths)
    if args.root.exists():
        shutil.rmtree(args.root)
    started = time.monotonic()
    spec = _spec(args, paths, base)
    deployment = Deployment(net.apply(spec) if net is not None else spec)
    try:
        print("starting services (each agent spawns its workers) ...")
        deployment.start()
        print(f"  up in {time.monotonic() - started:.0f}s; logs in {args.root / 'logs'}")
        deployment.wait_windows(
            args.windows, timeout_s=60 * 30, on_poll=Progress(deployment, started)
        )
        tokens = sum(
            st.tokens_total
            for org, _ in ORGS
            if (st := _agent_status(deployment.services[org].address)) is not None
        )
        status = deployment.coordinator_status()
        with deployment.channel("audit-log") as channel:
            checkpoint = AuditClient(channel).tree_head().checkpoint.decode()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process ...")
        deployment.stop()
        return 130
    except LaunchError as exc:
        print(f"\ndemo failed: {exc}")
        deployment.stop()
        return 1
    print("\nstopping services ...")
    codes = deployment.stop()
    print("  exit codes: " + ", ".join(f"{n}={c}" for n, c in codes.items()))
    return _finish(args, deployment, int(status.windows_completed), tokens, checkpoint, net)


def _finish(
    args: argparse.Namespace,
    deployment: Deployment,
    windows: int,
    tokens: int,
    checkpoint: str,
    net: Any = None,  # echelon_tools.netns.GlobalPlane, under make demo-netns
) -> int:
    from echelon_tools.evaluate import generate_sample, heldout_losses

    db = deployment.audit_db
    report_path = args.root / "audit-report.json"
    # The parties' own witness state (the latest tree head each verified), and with mTLS the
    # manifest: the log's and every party's keys come from it, not from the log.
    witnesses = sorted(args.root.glob("*/identity/witness.json"))
    checks = [arg for w in witnesses for arg in ("--witness", str(w))]
    if deployment.manifest is not None:
        checks += ["--manifest", str(deployment.manifest)]
    command = [sys.executable, "-m", "echelon_tools.cli", "audit", "verify", "--db", str(db)]
    verify = subprocess.run(
        [*command, *checks, "--json", str(report_path)],
        capture_output=True,
        text=True,
    )
    print("\n$ echelon audit verify --db", _shown(db), " ".join(_shown(Path(c)) for c in checks))
    print(verify.stdout.rstrip())
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    bytes_by_type, entries = _audit_bytes(db)
    print("\nevaluating held-out loss per organization (initial vs final global adapter) ...")
    losses = heldout_losses(deployment, [org for org, _ in ORGS])
    sample = generate_sample(deployment, ORGS[0][0], args.root / "export")
    print("\n" + "=" * 72)
    print(f"{'organization':<14}{'val loss before':>18}{'val loss after':>18}{'change':>12}")
    for org, (before, after) in losses.items():
        print(f"{org:<14}{before:>18.4f}{after:>18.4f}{after - before:>+12.4f}")
    print("-" * 72)
    print(f"windows completed      {windows}")
    print(f"tokens trained         {tokens:,}")
    print("bytes across boundaries (sent, by payload type):")
    for name, size in sorted(bytes_by_type.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22}{size:>14,}")
    print(f"audit entries          {entries}")
    transport = "mTLS, every party from its kit of the signed manifest"
    print(f"transport              {transport if deployment.manifest else 'INSECURE (plaintext)'}")
    print(
        f"audit verify           {report.get('summary', verify.stdout.strip().splitlines()[-1:])}"
    )
    print("final signed tree head (C2SP checkpoint):")
    print("  " + checkpoint.rstrip().replace("\n", "\n  "))
    print(f"exported adapter       {args.root / 'export' / 'adapter'}")
    print(f"sample from it         {sample!r}")
    if net is not None:
        print("-" * 72)
        print("\n".join(net.report()))
        net.close()
    print("=" * 72)
    improved = all(after < before for before, after in losses.values())
    return 0 if verify.returncode == 0 and improved else 1
