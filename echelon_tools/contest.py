"""The budget-matched contest: every strategy tuned over a small stated grid, then compared at
fixed tokens, bytes crossing boundaries, simulated wall-clock and sync count over several
seeds; and the stress runs (WAN latency, non-IID skew, device churn). All runs are simulator
runs of the same library, fanned out over worker processes (spawn).

CLI: `echelon contest --config configs/contest/default.toml --out docs/results`
(or `python -m echelon_tools.contest ...`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from echelon.sim.base import BaseConfig
from echelon.sim.config import SimConfig, World, prepare_world
from echelon.sim.data import CorpusConfig, PartitionConfig, Skew
from echelon.sim.driver import simulate
from echelon.sim.network import FaultConfig
from echelon.sim.results import RunResult, value_at
from echelon.strategy import STRATEGIES, Strategy, strategy
from echelon.tomlconfig import ConfigFileError, build, load_toml
from echelon_tools.contest_plots import loss_curves, stress_bars
from echelon_tools.contest_report import (
    Budgets,
    ContestReport,
    Selection,
    budget_cells,
    load_runs,
    markdown,
    save_runs,
    stress_rows,
    write_csv,
)

log = structlog.get_logger(__name__)

AXES = ("tokens", "bytes", "wall_s", "syncs")


@dataclass(frozen=True, kw_only=True)
class ContestConfig:
    """Which strategies, seeds and processes; the grid is a table per strategy."""

    strategies: tuple[str, ...] = tuple(STRATEGIES)
    seeds: tuple[int, ...] = (0, 1, 2)
    tune_seed: int = 100
    workers: int = 2
    frozen_a: tuple[str, ...] = ("diloco-sa", "echelon")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise ValueError(
                f"ContestConfig.strategies: unknown {unknown}; want {list(STRATEGIES)}"
            )
        if not self.seeds or self.workers < 1:
            raise ValueError("ContestConfig: want at least one seed and workers >= 1")
        if self.tune_seed in self.seeds:
            raise ValueError(
                f"ContestConfig.tune_seed: {self.tune_seed} is also an evaluation seed; want a "
                "held-apart seed so that tuning does not pick the noise it is scored on"
            )
        stray = sorted(set(self.frozen_a) - set(self.strategies))
        if stray:
            raise ValueError(f"ContestConfig.frozen_a: {stray} are not among the strategies")


@dataclass(frozen=True, kw_only=True)
class StressConfig:
    """One factor at a time away from the ideal setting (0 ms, IID, no churn)."""

    strategies: tuple[str, ...] = ("diloco-sa", "echelon", "echelon-da")
    seeds: tuple[int, ...] = (0, 1, 2)
    latency_ms: tuple[float, ...] = (0.0, 50.0, 100.0, 200.0)
    moderate_alpha: float = 0.5
    churn: tuple[float, ...] = (0.0, 0.1, 0.3)

    def __post_init__(self) -> None:
        if not self.strategies or not self.seeds:
            raise ValueError("StressConfig: want at least one strategy and one seed")


@dataclass(frozen=True)
class Job:
    key: str
    strategy: Strategy
    sim: SimConfig


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything read from the configuration file."""

    contest: ContestConfig
    stress: StressConfig
    corpus: CorpusConfig
    base: BaseConfig
    sim: SimConfig
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


def load_plan(path: Path) -> Plan:
    """Reads a contest TOML file. Raises ConfigFileError naming the table and key."""
    raw = load_toml(path)
    known = {"contest", "stress", "corpus", "base", "sim", "grid"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigFileError(f"{path}: unknown tables {unknown}; known: {sorted(known)}")
    sim = build(SimConfig, raw.get("sim"), "sim")
    grid: dict[str, dict[str, list[Any]]] = {}
    for name, table in dict(raw.get("grid", {})).items():
        if name not in STRATEGIES:
            raise ConfigFileError(
                f"[grid.{name}]: unknown strategy; want one of {list(STRATEGIES)}"
            )
        grid[name] = {k: list(v) if isinstance(v, list) else [v] for k, v in table.items()}
    return Plan(
        contest=build(ContestConfig, raw.get("contest"), "contest"),
        stress=build(StressConfig, raw.get("stress"), "stress"),
        corpus=build(CorpusConfig, raw.get("corpus"), "corpus"),
        base=build(BaseConfig, raw.get("base"), "base"),
        sim=sim,
        grid=grid,
    )


def grid_points(table: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a strategy's grid; `outer = [[lr, momentum], ...]` pairs."""
    keys = sorted(table)
    points: list[dict[str, Any]] = []
    for values in itertools.product(*(table[k] for k in keys)):
        point: dict[str, Any] = {}
        for k, v in zip(keys, values, strict=True):
            if k == "outer":
                point["outer_lr"], point["outer_momentum"] = float(v[0]), float(v[1])
            else:
                point[k] = v
        points.append(point)
    return points or [{}]


def label(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={point[k]}" for k in sorted(point)) or "default"


# -- running --------------------------------------------------------------------------------
_WORLD: World | None = None
_WORLD_OF: tuple[CorpusConfig, BaseConfig] | None = None


def _init_worker(corpus: CorpusConfig, base: BaseConfig) -> None:
    """Prepares this process's world once per (corpus, base): each stage reuses it."""
    global _WORLD, _WORLD_OF
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if _WORLD is None or (corpus, base) != _WORLD_OF:
        _WORLD, _WORLD_OF = prepare_world(corpus, base), (corpus, base)


def _run_job(job: Job) -> tuple[str, RunResult]:
    assert _WORLD is not None, "worker not initialised"
    return job.key, simulate(_WORLD, job.sim, job.strategy)


def run_jobs(jobs: Sequence[Job], plan: Plan) -> dict[str, RunResult]:
    """Runs jobs in `plan.contest.workers` spawned processes (inline for one worker)."""
    started = time.perf_counter()
    out: dict[str, RunResult] = {}
    if plan.contest.workers == 1 or len(jobs) == 1:
        _init_worker(plan.corpus, plan.base)
        for job in jobs:
            key, result = _run_job(job)
            out[key] = result
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(
            plan.contest.workers, initializer=_init_worker, initargs=(plan.corpus, plan.base)
        ) as pool:
            for key, result in pool.imap_unordered(_run_job, jobs):
                out[key] = result
    log.info("jobs_done", jobs=len(jobs), seconds=round(time.perf_counter() - started, 1))
    return out


def budgets_from(results: Sequence[RunResult], token_budget: int) -> Budgets:
    """Each budget is the least any exchanging run spent, so every run has a reading."""
    fed = [r for r in results if r.points[-1].syncs > 0] or list(results)
    return Budgets(
        tokens=float(token_budget),
        bytes=float(min(r.points[-1].bytes for r in fed)),
        wall_s=float(min(r.points[-1].wall_s for r in fed)),
        syncs=float(min(r.points[-1].syncs for r in fed)),
    )


def contest_jobs(plan: Plan) -> list[Job]:
    jobs = []
    for name in plan.contest.strategies:
        for point in grid_points(plan.grid.get(name, {})):
            sim = replace(plan.sim, seed=plan.contest.tune_seed)
            jobs.append(Job(f"tune|{name}|{label(point)}", strategy(name, **point), sim))
    return jobs


def select(plan: Plan, tuned: Mapping[str, RunResult], budgets: Budgets) -> list[Selection]:
    """Per strategy and budget, the grid point with the lowest tuning-seed loss."""
    out = []
    for name in plan.contest.strategies:
        points = grid_points(plan.grid.get(name, {}))
        for axis in AXES:
            scores = [
                value_at(tuned[f"tune|{name}|{label(p)}"], axis, budgets.get(axis)) for p in points
            ]
            best = points[int(np.argmin(scores))]
            out.append(Selection(strategy=name, axis=axis, point=best, label=label(best)))
    return out


def final_jobs(plan: Plan, selections: Sequence[Selection]) -> list[Job]:
    seen: dict[str, Job] = {}
    for sel in selections:
        variants = [(sel.strategy, False)]
        if sel.strategy in plan.contest.frozen_a and sel.axis == "tokens":
            variants.append((sel.strategy, True))
        for name, frozen in variants:
            for seed in plan.contest.seeds:
                key = f"final|{name}{'+frozen-A' if frozen else ''}|{sel.label}|{seed}"
                strat = strategy(name, frozen_a=frozen, **sel.point)
                seen.setdefault(key, Job(key, strat, replace(plan.sim, seed=seed)))
    return list(seen.values())


def stress_settings(plan: Plan) -> dict[str, SimConfig]:
    """The ideal setting and one factor changed at a time."""
    ideal = replace(
        plan.sim,
        link=replace(plan.sim.link, latency_s=0.0),
        partition=PartitionConfig(skew=Skew.IID),
        faults=FaultConfig(),
    )
    st = plan.stress
    out = {"ideal": ideal}
    for ms in st.latency_ms:
        if ms > 0:
            out[f"latency {ms:g} ms"] = replace(ideal, link=replace(ideal.link, latency_s=ms / 1e3))
    out["non-IID moderate"] = replace(
        ideal, partition=PartitionConfig(skew=Skew.DIRICHLET, alpha=st.moderate_alpha)
    )
    out["non-IID severe"] = replace(ideal, partition=PartitionConfig(skew=Skew.DOMAIN))
    for churn in st.churn:
        if churn > 0:
            out[f"churn {churn:.0%}"] = replace(ideal, faults=FaultConfig(churn=churn))
    return out


def stress_jobs(plan: Plan, selections: Sequence[Selection]) -> list[Job]:
    chosen = {s.strategy: s for s in selections if s.axis == "tokens"}
    jobs = []
    for setting, sim in stress_settings(plan).items():
        for name in plan.stress.strategies:
            sel = chosen.get(name)
            point = sel.point if sel else {}
            for seed in plan.stress.seeds:
                jobs.append(
                    Job(
                        f"stress|{setting}|{name}|{seed}",
                        strategy(name, **point),
                        replace(sim, seed=seed),
                    )
                )
    return jobs


def write_report(report: ContestReport, out: Path) -> None:
    """Writes contest.md, contest.csv, stress.csv, runs.json and the PNG plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_runs(report, out / "runs.json")
    stress = stress_rows(report) if report.stress else []
    cells = budget_cells(report)
    write_csv(
        out / "contest.csv",
        [
            {
                "strategy": row,
                "budget": axis,
                "budget_value": report.budgets.get(axis),
                "grid_point": c.label,
                "loss_mean": c.mean,
                "loss_std": c.std,
                "seeds": len(c.values),
                "values": " ".join(f"{v:.6f}" for v in c.values),
            }
            for row, by_axis in cells.items()
            for axis, c in by_axis.items()
        ],
    )
    write_csv(out / "stress.csv", stress)
    for axis in ("tokens", "bytes", "wall_s"):
        loss_curves(report, axis, out / f"loss_vs_{axis}.png")
    if stress:
        stress_bars(stress, out / "stress.png")
    (out / "contest.md").write_text(markdown(report, stress), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """`echelon contest`: tune, compare under four budgets, stress; write table and plots."""
    parser = argparse.ArgumentParser(prog="echelon contest", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("configs/contest/default.toml"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--workers", type=int, default=None, help="override [contest].workers")
    parser.add_argument("--no-stress", action="store_true", help="skip the stress runs")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report from OUT/runs.json"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        plan = load_plan(args.config)
    except ConfigFileError as exc:
        print(f"echelon contest: {exc}", file=sys.stderr)
        return 2
    if args.workers is not None:
        plan = replace(plan, contest=replace(plan.contest, workers=args.workers))
    if args.report_only:
        write_report(load_runs(args.out / "runs.json", plan.sim), args.out)
        print(f"echelon contest: rebuilt {args.out}/contest.md from runs.json")
        return 0
    started = time.perf_counter()
    _init_worker(plan.corpus, plan.base)  # builds and caches the corpus and base once
    tuned = run_jobs(contest_jobs(plan), plan)
    budgets = budgets_from(list(tuned.values()), plan.sim.token_budget)
    selections = select(plan, tuned, budgets)
    finals = run_jobs(final_jobs(plan, selections), plan)
    stress = {} if args.no_stress else run_jobs(stress_jobs(plan, selections), plan)
    command = " ".join(
        ["echelon contest", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]
    )
    report = ContestReport(
        command=command,
        config_path=str(args.config),
        config_text=args.config.read_text(encoding="utf-8"),
        budgets=budgets,
        selections=selections,
        tuned=tuned,
        finals=finals,
        stress=stress,
        stress_settings=list(stress_settings(plan)) if stress else [],
        seconds=time.perf_counter() - started,
        sim=plan.sim,
        grid=json.loads(json.dumps(plan.grid)),
    )
    write_report(report, args.out)
    print(f"echelon contest: wrote {args.out}/contest.md in {report.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
