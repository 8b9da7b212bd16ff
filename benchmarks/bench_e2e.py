"""End-to-end benchmark: tokens/s of a real 2-organization deployment against the same
devices training with no synchronization at all, measured side by side in one run.

Run `python benchmarks/bench_e2e.py` (or `make bench`); `--json PATH` also writes the figures.
Three kinds of measurement, in the order (a), (c), (b), (c) on this machine:

(a) a real deployment on loopback (audit log, coordinator, two boundary agents, each
    spawning its device workers; every one a process): both levels of secure aggregation
    and the audit log on, Echelon-DA (delay-aware overlap), H fixed;
(c) the baseline: the same workers (each agent's pool, built from that agent's own TOML
    file: same device count, model, data, batch) of both organizations training windows
    of H steps back to back at the same time, with no synchronization, level 1 and the
    per-window evaluation off;
(b) the deployment of (a) with every link between an organization and the global plane
    delayed by the configured latency one way (and capped at the configured bandwidth).

The baseline runs twice, so that each deployment has one next to it; the ratios are against
the mean of the two, and the table shows how far the machine moved between them.

Tokens/s counts the tokens the devices trained over the steady windows: from the commit of
the first window (warm-up, left out: the pools are still spawning) to the commit of the
last measured window (one more window runs after it, so that every training run that
overlaps the interval has finished and been logged), each run's tokens spread over its
seconds (from the agents' `delta_ready` events). The baseline's interval runs from the end of
both pools' first window to the end of the first pool's last. Devices idle = 1 - the seconds
a boundary's pool was running / the interval, averaged over the boundaries. Ratios against
the baseline are compared with the issue's targets; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echelon.tomlconfig import build, load_toml
from echelon_tools.pool_bench import agent_pool_config, no_sync_runs
from echelon_tools.runlogs import Throughput, commits, throughput, training_runs
from echelon_tools.wancheck import CheckPlan, deployment_spec, load_plan, run_deployment

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class E2EConfig:
    """The strategy of the deployments and the targets ([e2e] of the config file)."""

    delay_aware: bool = True  # Echelon-DA
    eval_every: int = 0  # held-out evaluation after every N-th window; 0: of the last only
    eval_batches: int = 1
    target_loopback: float = 0.95
    target_wan: float = 0.90


@dataclass(frozen=True)
class Measured:
    """One of the three runs over its steady windows."""

    name: str
    rate: Throughput
    window_s: tuple[float, ...]  # per steady window: the coordinator's (a pool run's) seconds
    run_s: tuple[float, ...]  # seconds of each pool run that ended in the interval

    def row(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.rate.tokens_per_s,
            "tokens": self.rate.tokens,
            "seconds": self.rate.seconds,
            "idle_fraction": self.rate.idle_fraction,
            "idle_by_boundary": self.rate.idle,
            "window_s": list(self.window_s),
            "run_s": list(self.run_s),
        }


def deployment(
    plan: CheckPlan, e2e: E2EConfig, root: Path, latency_ms: float
) -> tuple[Measured, dict[str, Path]]:
    """Runs one deployment for the check's windows plus one; returns what it measured over
    windows 2..windows and each agent's configuration file."""
    check = plan.check
    spec = deployment_spec(
        plan,
        root,
        latency_ms,
        coordinator={
            "coordinator": {
                "run_id": "bench-e2e",
                "windows": check.windows + 1,
                "delay_aware": e2e.delay_aware,
            },
            "secagg": {"level1": True, "level2": True},
        },
        agents={"devices": {"eval_batches": e2e.eval_batches, "eval_every": e2e.eval_every}},
    )
    ran = run_deployment(spec, check.windows + 1, check.timeout_s)
    done = commits(ran.services["coordinator"].log_path)
    if len(done) < check.windows:
        raise RuntimeError(f"bench-e2e: {len(done)} windows committed under {root}")
    first, last = done[0], done[check.windows - 1]
    runs = [
        run
        for site in spec.sites
        for run in training_runs(ran.services[site.boundary].log_path, site.boundary)
    ]
    steady = tuple(c.seconds for c in done[1 : check.windows])
    name = "loopback" if latency_ms == 0 else f"{latency_ms:.0f} ms one way"
    inside = tuple(r.seconds for r in runs if first.at < r.end <= last.at)
    measured = Measured(name, throughput(runs, first.at, last.at), steady, inside)
    return measured, {site.boundary: ran.agent_config(site.boundary) for site in spec.sites}


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Sends this process's stdout and stderr (and those of processes it spawns) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def baseline(plan: CheckPlan, agents: dict[str, Path], root: Path) -> Measured:
    """The same workers of every boundary training back to back with no synchronization."""
    check = plan.check
    configs = {b: agent_pool_config(path, root / b) for b, path in agents.items()}
    (root / "logs").mkdir(parents=True, exist_ok=True)
    with output_to(root / "logs" / "baseline.log"):
        runs = no_sync_runs(configs, steps=check.inner_steps, windows=check.windows + 1)
    by = {b: [r for r in runs if r.boundary == b] for b in agents}  # runs come sorted by end
    start = max(rs[0].end for rs in by.values())
    end = min(rs[-1].end for rs in by.values())
    inside = tuple(r.seconds for r in runs if start < r.end <= end)
    return Measured("no synchronization", throughput(runs, start, end), inside, inside)


def report(
    plan: CheckPlan, e2e: E2EConfig, bases: list[Measured], loop: Measured, wan: Measured
) -> tuple[str, dict[str, Any]]:
    """The table and its JSON form; the baseline is the mean of its measurements."""
    check = plan.check
    base_rate = statistics.fmean(b.rate.tokens_per_s for b in bases)
    drift = bases[-1].rate.tokens_per_s / bases[0].rate.tokens_per_s - 1
    lines = [
        f"end-to-end throughput: 2 organizations x {check.workers} device workers, tiny Llama "
        f"({plan.base.layers} layers, hidden {plan.base.hidden}), LoRA, batch "
        f"{check.batch_size} x {plan.corpus.seq_len}, H = {check.inner_steps}",
        f"deployments: secure aggregation levels 1 and 2 on, audit log on, "
        f"{'Echelon-DA (delay-aware overlap)' if e2e.delay_aware else 'no overlap'}"
        f"{', pre-keyed' if check.prekey else ''}, H fixed, evaluation of {e2e.eval_batches} "
        + (
            f"batch(es) after every {e2e.eval_every} window(s), overlapping the sync"
            if e2e.eval_every
            else "batch(es) of the run's last version only"
        ),
        f"WAN: {check.latency_ms:.0f} ms one way, {check.bandwidth_mbps:g} Mbit/s per direction, "
        "on every link between an organization and the global plane",
        f"first window left out as warm-up; {check.windows - 1} steady windows per deployment "
        "(one more runs after them); one shared machine: figures are noisy",
        "baseline measured after (a) and after (b): "
        + ", ".join(f"{b.rate.tokens_per_s:.0f}" for b in bases)
        + f" tokens/s ({drift:+.1%} between them); ratios are against their mean",
        "",
        f"{'run':<34}{'tokens/s':>10}{'vs no-sync':>12}{'target':>8}{'':>6}"
        f"{'devices idle':>14}{'s/window':>10}{'s/run':>8}",
    ]
    data: dict[str, Any] = {
        "config": asdict(check),
        "e2e": asdict(e2e),
        "baseline": {
            "tokens_per_s": base_rate,
            "drift": drift,
            "runs": [b.row() for b in bases],
        },
    }
    base_run_s = [s for b in bases for s in b.run_s]
    lines.append(
        f"{'(c) ' + bases[0].name:<34}{base_rate:>10.0f}{1.0:>12.3f}{'':>14}"
        f"{statistics.fmean(b.rate.idle_fraction for b in bases):>14.1%}"
        f"{statistics.fmean(base_run_s):>10.2f}{statistics.fmean(base_run_s):>8.2f}"
    )
    rows = [
        ("loopback", "(a) " + loop.name, loop, e2e.target_loopback),
        ("wan", "(b) " + wan.name, wan, e2e.target_wan),
    ]
    for key, label, m, target in rows:
        ratio = m.rate.tokens_per_s / base_rate
        verdict = "PASS" if ratio >= target else "FAIL"
        per_window, per_run = statistics.fmean(m.window_s), statistics.fmean(m.run_s)
        lines.append(
            f"{label:<34}{m.rate.tokens_per_s:>10.0f}{ratio:>12.3f}{target:>8.2f}{verdict:>6}"
            f"{m.rate.idle_fraction:>14.1%}{per_window:>10.2f}{per_run:>8.2f}"
        )
        data[key] = {**m.row(), "ratio": ratio, "target": target, "verdict": verdict}
    lines.append(
        "s/window: the coordinator's seconds per window (the baseline: a pool's run); s/run: a "
        "device pool's run of H steps (with level-1 aggregation and evaluation in (a), (b))"
    )
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench-e2e.toml")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--root", type=Path, help="keep the runs' logs here (default: tmp)")
    parser.add_argument("--windows", type=int, help="windows per deployment (config: [check])")
    parser.add_argument("--inner-steps", type=int, help="H, steps per window (config: [check])")
    args = parser.parse_args(argv)
    plan = load_plan(args.config)
    for key, value in (("windows", args.windows), ("inner_steps", args.inner_steps)):
        if value is not None:
            plan = replace(plan, check=replace(plan.check, **{key: value}))
    if not plan.corpus.cache_dir.is_absolute():  # the repository's cache, from anywhere
        plan = replace(plan, corpus=replace(plan.corpus, cache_dir=ROOT / plan.corpus.cache_dir))
    e2e = build(E2EConfig, load_toml(args.config).get("e2e"), "e2e")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print(f"bench-e2e: runs under {root}", flush=True)
        loop, agents = deployment(plan, e2e, root / "loopback", 0.0)
        print(f"  (a) loopback: {loop.rate.tokens_per_s:.0f} tokens/s", flush=True)
        bases = [baseline(plan, agents, root / "baseline-1")]
        print(f"  (c) no synchronization: {bases[0].rate.tokens_per_s:.0f} tokens/s", flush=True)
        wan, _ = deployment(plan, e2e, root / "wan", plan.check.latency_ms)
        print(f"  (b) {wan.name}: {wan.rate.tokens_per_s:.0f} tokens/s", flush=True)
        bases.append(baseline(plan, agents, root / "baseline-2"))
        print(f"  (c) again: {bases[1].rate.tokens_per_s:.0f} tokens/s", flush=True)
        text, data = report(plan, e2e, bases, loop, wan)
    data["seconds"] = time.monotonic() - started
    print(text)
    print(f"bench-e2e: {data['seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
