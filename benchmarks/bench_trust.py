"""What authentication, authorization and inclusion proofs cost: a demo-shaped deployment on
loopback with every party on mTLS from its kit of a signed manifest, every call authorized
by its peer certificate, every audit append answered with its proof and every frame carrying
its sender's tree head (checked by the receiver), against the same deployment with all of
them off (plaintext, `insecure = true`, no log key: no proof asked for, none checked),
measured side by side in one run: on, off, on, off.

Run `python benchmarks/bench_trust.py` (or `make bench`); `--json PATH` also writes the
figures. The figure is the mean seconds of a steady window (the coordinator's, from the
commit of the first to the last: the first, which includes the pools' start, is left out)
and the overhead is on/off - 1 over the pooled windows, against issue 11's target (3 %).
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echelon_tools.runlogs import commits
from echelon_tools.wancheck import deployment_spec, load_plan, run_deployment

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.03


def measure(plan: Any, root: Path, trusted: bool) -> list[float]:
    """One deployment's steady windows, in seconds."""
    check = plan.check
    spec = deployment_spec(
        plan,
        root,
        0.0,
        coordinator={
            "coordinator": {"run_id": "bench-trust", "windows": check.windows + 1},
            "secagg": {"level1": True, "level2": True},
        },
        agents={"devices": {"eval_batches": 1, "eval_every": 0}},
    )
    spec = dataclasses.replace(spec, mtls=trusted, witness=trusted)
    ran = run_deployment(spec, check.windows + 1, check.timeout_s)
    done = commits(ran.services["coordinator"].log_path)
    if len(done) < check.windows:
        raise RuntimeError(f"bench-trust: {len(done)} windows committed under {root}")
    return [c.seconds for c in done[1 : check.windows]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_trust", description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench-e2e.toml")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of deployments (on, off)")
    parser.add_argument("--windows", type=int, help="windows per deployment")
    args = parser.parse_args(argv)
    plan = load_plan(args.config)
    if args.windows:
        plan = dataclasses.replace(
            plan, check=dataclasses.replace(plan.check, windows=args.windows)
        )
    on: list[float] = []
    off: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: mTLS + authorization + proofs on ...", flush=True)
            on += measure(plan, Path(tmp) / f"on-{i}", trusted=True)
            print(f"round {i + 1}/{args.rounds}: all off (plaintext, no proofs) ...", flush=True)
            off += measure(plan, Path(tmp) / f"off-{i}", trusted=False)
    mean_on, mean_off = statistics.fmean(on), statistics.fmean(off)
    overhead = mean_on / mean_off - 1.0
    verdict = "met" if overhead <= TARGET else "NOT met"
    print(f"\n{'':<34}{'windows':>8}{'mean s':>10}{'stdev s':>10}")
    for name, xs in (("mTLS, authorization, proofs", on), ("off (plaintext, no proofs)", off)):
        print(f"{name:<34}{len(xs):>8}{statistics.fmean(xs):>10.3f}{statistics.pstdev(xs):>10.3f}")
    print(f"overhead: {overhead:+.1%} of a window (target <= {TARGET:.0%}): {verdict}")
    if args.json is not None:
        figures = {
            "on_window_s": on,
            "off_window_s": off,
            "overhead": overhead,
            "target": TARGET,
            "met": overhead <= TARGET,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
