"""End-to-end benchmark: tokens/s of a real 2-organization deployment against the same
devices training with no synchronization at all, measured side by side in one run.

Run `python benchmarks/bench_e2e.py` (or `make bench`); `--json PATH` also writes the figures.
Three kinds of measurement, in the order (a), (c), (b), (c), repeated for [e2e] rounds:

(a) a real deployment on loopback (audit log, coordinator, two boundary agents, each
    spawning its device workers; every one a process): both levels of secure aggregation
    and the audit log on, Echelon-DA (delay-aware overlap), H fixed;
(c) the baseline: the same workers (each agent's pool, built from that agent's own TOML
    file: same device count, model, data, batch) of both organizations training windows
    of H steps back to back at the same time, with no synchronization, level 1 and the
    per-window evaluation off;
(b) the deployment of (a) with every link between an organization and the global plane
    delayed by the configured latency one way (and capped at the configured bandwidth).

A baseline runs after each deployment, so that every deployment has one on each side (the
first: after it only); a deployment's ratio is against the mean of its neighbours, and the
table gives each kind's median ratio over the rounds with its range, and how far the
baseline moved over the whole run. The machine's speed drifts by several per cent within a
minute, so one pair of runs is not a verdict: the median of interleaved pairs is.

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
    rounds: int = 3  # (a), (c), (b), (c) this many times; verdicts on the median ratio


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


@dataclass(frozen=True)
class Paired:
    """A deployment's measurement and its ratio against the baselines next to it."""

    kind: str  # "loopback" or "wan"
    measured: Measured
    ratio: float


def paired(sequence: list[tuple[str, Measured]]) -> list[Paired]:
    """Each deployment in `sequence` (in the order run) against the mean tokens/s of the
    baseline runs right before and right after it."""
    out = []
    for i, (kind, m) in enumerate(sequence):
        if kind == "baseline":
            continue
        near = [
            sequence[j][1].rate.tokens_per_s
            for j in (i - 1, i + 1)
            if 0 <= j < len(sequence) and sequence[j][0] == "baseline"
        ]
        out.append(Paired(kind, m, m.rate.tokens_per_s / statistics.fmean(near)))
    return out


def report(
    plan: CheckPlan, e2e: E2EConfig, sequence: list[tuple[str, Measured]]
) -> tuple[str, dict[str, Any]]:
    """The table and its JSON form: per kind of deployment, the median over the rounds of
    its ratio against its neighbouring baselines."""
    check = plan.check
    bases = [m for kind, m in sequence if kind == "baseline"]
    base_rates = [b.rate.tokens_per_s for b in bases]
    spread = max(base_rates) / min(base_rates) - 1
    pairs = paired(sequence)
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
        f"(one more runs after them); {e2e.rounds} round(s) of (a), (c), (b), (c) on one "
        "shared machine",
        "baseline after each deployment: "
        + ", ".join(f"{r:.0f}" for r in base_rates)
        + f" tokens/s (max/min {spread:+.1%}); each deployment's ratio is against the "
        "baselines next to it",
        "",
        f"{'run':<24}{'tokens/s':>10}{'vs no-sync':>12}{'range':>14}{'target':>8}{'':>6}"
        f"{'rounds >=':>10}{'devices idle':>14}{'s/window':>10}{'s/run':>8}",
    ]
    data: dict[str, Any] = {
        "config": asdict(check),
        "e2e": asdict(e2e),
        "baseline": {
            "tokens_per_s": statistics.median(base_rates),
            "spread": spread,
            "runs": [b.row() for b in bases],
        },
    }
    base_run_s = [s for b in bases for s in b.run_s]
    lines.append(
        f"{'(c) ' + bases[0].name:<24}{statistics.median(base_rates):>10.0f}{1.0:>12.3f}"
        f"{'':>38}{statistics.fmean(b.rate.idle_fraction for b in bases):>14.1%}"
        f"{statistics.fmean(base_run_s):>10.2f}{statistics.fmean(base_run_s):>8.2f}"
    )
    rows = [
        ("loopback", "(a) loopback", e2e.target_loopback),
        ("wan", f"(b) {check.latency_ms:.0f} ms one way", e2e.target_wan),
    ]
    for key, label, target in rows:
        mine = [p for p in pairs if p.kind == key]
        ratios = [p.ratio for p in mine]
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio >= target else "FAIL"
        ms = [p.measured for p in mine]
        rate = statistics.median(m.rate.tokens_per_s for m in ms)
        idle = statistics.fmean(m.rate.idle_fraction for m in ms)
        per_window = statistics.fmean(s for m in ms for s in m.window_s)
        per_run = statistics.fmean(s for m in ms for s in m.run_s)
        span = f"{min(ratios):.3f}-{max(ratios):.3f}"
        met = f"{sum(r >= target for r in ratios)}/{len(ratios)}"
        lines.append(
            f"{label:<24}{rate:>10.0f}{ratio:>12.3f}{span:>14}{target:>8.2f}{verdict:>6}"
            f"{met:>10}{idle:>14.1%}{per_window:>10.2f}{per_run:>8.2f}"
        )
        data[key] = {
            "ratio": ratio,
            "ratios": ratios,
            "target": target,
            "verdict": verdict,
            "runs": [{**p.measured.row(), "ratio": p.ratio} for p in mine],
        }
    lines.append(
        "tokens/s: the median of the runs' (the baseline's too); vs no-sync: the median over "
        "the rounds of each deployment against its neighbouring baselines, and the verdict; "
        "range: the lowest and highest; rounds >=: how many met the target. s/window: the "
        "coordinator's seconds per window (the baseline: a pool's run); s/run: a device "
        "pool's run of H steps (with level-1 aggregation and evaluation in (a), (b))"
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
    if e2e.rounds < 1:
        parser.error(f"{args.config}: [e2e] rounds = {e2e.rounds}, want 1 or more")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = args.root or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        print(f"bench-e2e: runs under {root}", flush=True)
        sequence: list[tuple[str, Measured]] = []
        for n in range(1, e2e.rounds + 1):
            for kind, latency in (("loopback", 0.0), ("wan", plan.check.latency_ms)):
                m, agents = deployment(plan, e2e, root / f"{kind}-{n}", latency)
                print(f"  round {n}: {m.name}: {m.rate.tokens_per_s:.0f} tokens/s", flush=True)
                sequence.append((kind, m))
                base = baseline(plan, agents, root / f"baseline-{kind}-{n}")
                print(f"  round {n}: no sync: {base.rate.tokens_per_s:.0f} tokens/s", flush=True)
                sequence.append(("baseline", base))
        text, data = report(plan, e2e, sequence)
    data["seconds"] = time.monotonic() - started
    print(text)
    print(f"bench-e2e: {data['seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
