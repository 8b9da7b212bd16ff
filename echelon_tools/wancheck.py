"""The real-latency check: one stress setting run through the real services with latency on
the wire, beside the simulator's prediction of the same setting.

    echelon wan-check --config configs/wan-check.toml --out docs/results

Method. Two real deployments (audit log, coordinator, two boundary agents with their device
workers, every one a process) run DiLoCo+SA windows (pre-keyed unless `prekey = false`):
one on plain loopback, one with every
byte between the boundaries and the global plane delayed by the configured one-way latency
and capped at the configured bandwidth (`echelon_tools.wan` delaying proxies; this kernel has no
netem). The loopback run calibrates the two numbers the simulator cannot know: the devices'
speed (tokens per device per window / the agents' measured training seconds) and the
services' fixed per-window cost (window seconds minus the simulated window at 0 ms: audit
appends, secure-aggregation arithmetic, process wake-ups). The simulator then runs the same
strategy, model size, H, cohort and link, and its window time at the configured latency plus
that fixed cost is the prediction for the WAN run, which it never saw. The check passes
when |prediction - measured| <= tolerance x measured, over the steady-state windows (the
first window also delivers version 0 and is left out of both).

The report also gives, per window at the configured latency, the communication time (window
seconds minus the training part) and the round trips between an organization and the
coordinator, counted from the frames the agents logged, beside the latency-derived estimate
(WAN window - loopback window) / (2 x latency), which also holds any wait on the audit log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from echelon.sim.base import BaseConfig
from echelon.sim.config import SimConfig, World, prepare_world
from echelon.sim.data import CorpusConfig, PartitionConfig, Skew
from echelon.sim.driver import Simulation
from echelon.sim.network import LinkConfig
from echelon.strategy import strategy
from echelon.tomlconfig import build, load_toml
from echelon.training.corpus import cached_domain
from echelon_tools.launcher import Deployment, DeploymentSpec, Site
from echelon_tools.runlogs import commits, round_trips, training_runs

STRATEGY = "diloco-sa"


@dataclass(frozen=True, kw_only=True)
class CheckConfig:
    """The setting: two organizations, DiLoCo+SA windows of H steps, one WAN link."""

    latency_ms: float = 200.0
    bandwidth_mbps: float = 20.0
    windows: int = 6
    inner_steps: int = 8
    workers: int = 2
    batch_size: int = 4
    lr: float = 5e-3
    tolerance: float = 0.10
    prekey: bool = True  # pre-keying, as the services run level 2 by default, in both
    max_tokens_per_file: int = 60_000
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.latency_ms <= 0 or self.bandwidth_mbps <= 0:
            raise ValueError(
                f"CheckConfig: got latency_ms={self.latency_ms}, bandwidth_mbps="
                f"{self.bandwidth_mbps}; want both > 0"
            )
        if self.windows < 3 or self.inner_steps < 1 or self.workers < 1:
            raise ValueError("CheckConfig: want windows >= 3, inner_steps >= 1, workers >= 1")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"CheckConfig.tolerance: got {self.tolerance}, want in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class CheckPlan:
    check: CheckConfig = field(default_factory=CheckConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    base: BaseConfig = field(default_factory=BaseConfig)


def load_plan(path: Path) -> CheckPlan:
    raw = load_toml(path)
    return CheckPlan(
        check=build(CheckConfig, raw.get("check"), "check"),
        corpus=build(CorpusConfig, raw.get("corpus"), "corpus"),
        base=build(BaseConfig, raw.get("base"), "base"),
    )


@dataclass(frozen=True)
class RealRun:
    """What one real deployment measured: per-window seconds, the agents' training time and
    the round trips between an organization and the coordinator."""

    latency_ms: float
    window_s: tuple[float, ...]  # steady-state windows, coordinator clock
    train_s: tuple[float, ...]  # per steady-state window, the slower boundary's training
    tokens_per_window: int  # per device
    round_trips: tuple[int, ...] = ()  # per steady-state window, the most any agent waited on

    @property
    def mean_window_s(self) -> float:
        return statistics.fmean(self.window_s)

    @property
    def mean_train_s(self) -> float:
        return statistics.fmean(self.train_s)

    @property
    def comm_s(self) -> tuple[float, ...]:
        """Communication per window: window seconds minus the training part."""
        return tuple(w - t for w, t in zip(self.window_s, self.train_s, strict=True))

    @property
    def mean_comm_s(self) -> float:
        return statistics.fmean(self.comm_s)

    @property
    def mean_round_trips(self) -> float:
        return statistics.fmean(self.round_trips) if self.round_trips else float("nan")


def deployment_spec(
    plan: CheckPlan,
    root: Path,
    latency_ms: float,
    *,
    coordinator: dict[str, dict[str, Any]] | None = None,
    agents: dict[str, dict[str, Any]] | None = None,
) -> DeploymentSpec:
    """The check's deployment at `latency_ms` one way; `coordinator` and `agents` tables
    override its keys (table by table), e.g. to turn level 1 or Echelon-DA on."""
    check, corpus, base = plan.check, plan.corpus, plan.base
    files = [cached_domain(d, corpus.cache_dir).path for d in corpus.domains[:2]]
    wan = latency_ms > 0
    sites = tuple(
        Site(
            boundary=f"org-{chr(ord('a') + i)}",
            data_files=(f,),
            workers=check.workers,
            wan_delay_s=latency_ms / 1000.0,
            bandwidth_mbps=check.bandwidth_mbps if wan else None,
        )
        for i, f in enumerate(files)
    )
    seq = corpus.seq_len
    spec = DeploymentSpec(
        root=root,
        sites=sites,
        tokenizer_files=tuple(files),
        coordinator_tables={
            "coordinator": {
                "run_id": "wan-check",
                "windows": check.windows,
                "token_unit": 4096.0,
                "prekey": check.prekey,
            },
            "window": {"inner_steps": check.inner_steps, "deadline_s": 600.0},
            "inner": {"lr": check.lr, "batch_size": check.batch_size, "seq_len": seq},
            "outer": {"lr": 0.7, "momentum": 0.9},
            # Level 2 only: the simulator models level 1 as a plain mean (docs/contest.md).
            "secagg": {"level1": False, "level2": True},
        },
        agent_tables={
            "data": {"seq_len": seq, "max_tokens_per_file": check.max_tokens_per_file},
            "tokenizer": {"vocab_size": corpus.vocab_size},
            "model": {
                "layers": base.layers,
                "hidden": base.hidden,
                "heads": base.heads,
                "intermediate": base.intermediate,
            },
            "inner": {
                "batch_size": check.batch_size,
                "seq_len": seq,
                "warmup_steps": 2,
                "total_steps": check.windows * check.inner_steps + 5,
            },
            "devices": {"eval_batches": 2},
        },
    )
    return replace(
        spec,
        coordinator_tables=_overlay(spec.coordinator_tables, coordinator or {}),
        agent_tables=_overlay(spec.agent_tables, agents or {}),
    )


def _overlay(
    base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    out = {name: dict(table) for name, table in base.items()}
    for name, table in extra.items():
        out.setdefault(name, {}).update(table)
    return out


def run_deployment(spec: DeploymentSpec, windows: int, timeout_s: float) -> Deployment:
    """Runs `spec` until `windows` windows committed and stops it; the stopped deployment
    names its services' logs. Raises RuntimeError (or LaunchError) when a service failed."""
    deployment = Deployment(spec)
    with deployment:
        deployment.start(timeout_s=timeout_s)
        deployment.wait_windows(windows, timeout_s=timeout_s)
        codes = deployment.stop()
    if any(code != 0 for code in codes.values()):
        raise RuntimeError(f"a service exited badly: {codes}; logs under {spec.root}")
    return deployment


def run_real(plan: CheckPlan, root: Path, latency_ms: float) -> RealRun:
    """One real deployment for `plan.check.windows` windows at `latency_ms` one way."""
    check = plan.check
    deployment = run_deployment(
        deployment_spec(plan, root, latency_ms), check.windows, check.timeout_s
    )
    done = commits(deployment.services["coordinator"].log_path)
    if len(done) < check.windows:
        raise RuntimeError(f"wan-check: {len(done)} committed windows logged, want {check.windows}")
    steady = done[1 : check.windows]
    trained: dict[int, float] = {}
    trips: dict[int, int] = {}
    for name in (s.boundary for s in deployment.spec.sites):
        log_path = deployment.services[name].log_path
        for run in training_runs(log_path, name):
            trained[run.window] = max(trained.get(run.window, 0.0), run.seconds)
        for w, n in round_trips(log_path, name).items():
            trips[w] = max(trips.get(w, 0), n)
    windows = [c.window for c in steady]
    missing = [w for w in windows if w not in trained]
    if missing:
        raise RuntimeError(f"wan-check: no delta_ready with train_s for windows {missing}")
    return RealRun(
        latency_ms=latency_ms,
        window_s=tuple(c.seconds for c in steady),
        train_s=tuple(trained[w] for w in windows),
        tokens_per_window=check.inner_steps * check.batch_size * plan.corpus.seq_len,
        # The last delivery may not reach an agent before it is stopped: counted where it did.
        round_trips=tuple(trips[w] for w in windows if w in trips),
    )


@dataclass(frozen=True)
class Prediction:
    sim_window_0_s: float
    sim_window_s: float
    overhead_s: float
    device_tokens_s: float
    dim: int

    @property
    def window_s(self) -> float:
        return self.sim_window_s + self.overhead_s


def _sim_window_s(plan: CheckPlan, world: World, cfg: SimConfig) -> tuple[float, int]:
    """Mean steady-state seconds between commits in the simulator, and its adapter size."""
    check = plan.check
    setting = strategy(STRATEGY, inner_steps=check.inner_steps, prekey=check.prekey)
    sim = Simulation(world, cfg, setting)
    commits = [p.wall_s for p in sim.run().points[1:]]
    gaps = [b - a for a, b in itertools.pairwise(commits)][: check.windows - 1]
    if len(gaps) < check.windows - 1:
        raise RuntimeError(f"wan-check: the simulator committed {len(commits)} windows")
    return statistics.fmean(gaps), sim.dim


def predict(plan: CheckPlan, calibration: RealRun) -> Prediction:
    """The simulator's window time at the check's latency, calibrated on the loopback run."""
    check = plan.check
    speed = calibration.tokens_per_window / calibration.mean_train_s
    cfg = SimConfig(
        boundaries=2,
        devices=check.workers,
        speeds=(1.0, 1.0),
        device_tokens_s=speed,
        link=LinkConfig(latency_s=0.0, bandwidth_mbps=1e6),
        partition=PartitionConfig(skew=Skew.IID),
        batch_size=check.batch_size,
        token_budget=2 * check.workers * (check.windows + 1) * calibration.tokens_per_window,
        k_min=min(2, check.workers),
    )
    world = prepare_world(plan.corpus, plan.base)
    base_s, dim = _sim_window_s(plan, world, cfg)
    link = LinkConfig(latency_s=check.latency_ms / 1000.0, bandwidth_mbps=check.bandwidth_mbps)
    wan_s, _ = _sim_window_s(plan, world, replace(cfg, link=link))
    return Prediction(
        sim_window_0_s=base_s,
        sim_window_s=wan_s,
        overhead_s=calibration.mean_window_s - base_s,
        device_tokens_s=speed,
        dim=dim,
    )


def _std(xs: tuple[float, ...]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def round_trip_estimate(plan: CheckPlan, loopback: RealRun, wan: RealRun) -> float:
    """(WAN window - loopback window) / (2 x latency): every second the latency added to a
    window, in round trips."""
    return (wan.mean_window_s - loopback.mean_window_s) / (2 * plan.check.latency_ms / 1000.0)


def communication(plan: CheckPlan, loopback: RealRun, wan: RealRun) -> list[str]:
    """The report's section on round trips and communication time per window."""
    ms = f"{plan.check.latency_ms:.0f} ms"
    estimate = round_trip_estimate(plan, loopback, wan)
    return [
        "## Round trips and communication per window",
        "",
        f"| per window (means over the same windows) | loopback | {ms} |",
        "|---|---|---|",
        f"| window seconds | {loopback.mean_window_s:.3f} | {wan.mean_window_s:.3f} |",
        f"| training part (slower boundary) | {loopback.mean_train_s:.3f} | "
        f"{wan.mean_train_s:.3f} |",
        f"| **communication** (window - training) | {loopback.mean_comm_s:.3f} | "
        f"**{wan.mean_comm_s:.3f}** |",
        f"| **round trips** to the coordinator, counted | {loopback.mean_round_trips:.1f} | "
        f"**{wan.mean_round_trips:.1f}** |",
        "",
        f"Round trips are counted from the frames each agent recorded (one `audit_recorded` "
        "event per frame either way): each step from a frame it sent to one it received is a "
        "round trip it waited on, per cycle from one global version's delivery to the next; "
        "the most any agent waited on. The audit log's round trips are not in that count "
        "(agents do not log when their pipelined appends are answered). Latency-derived "
        f"estimate, (window at {ms} - loopback window) / (2 x {ms}): **{estimate:.2f}** round "
        "trips. It differs from the count where the latency added time elsewhere (waiting on "
        f"the audit log, transfer at {plan.check.bandwidth_mbps:g} Mbit/s) or was hidden "
        "behind work a loopback window also does (training runs during the first round trips).",
        "",
    ]


def report(
    plan: CheckPlan, loopback: RealRun, wan: RealRun, pred: Prediction, command: str
) -> tuple[str, dict[str, Any], bool]:
    """The Markdown report, its JSON form, and whether the prediction is within tolerance."""
    check = plan.check
    error = (pred.window_s - wan.mean_window_s) / wan.mean_window_s
    ok = abs(error) <= check.tolerance
    real_delta = wan.mean_window_s - loopback.mean_window_s
    sim_delta = pred.sim_window_s - pred.sim_window_0_s
    lines = [
        "# Real-latency check: the services under WAN delay against the simulator",
        "",
        f"Produced by `{command}`.",
        "",
        "## Setting",
        "",
        f"- {STRATEGY}: 2 organizations x {check.workers} device workers, H = "
        f"{check.inner_steps}, batch {check.batch_size} x {plan.corpus.seq_len} tokens, level-2 "
        "secure aggregation (level 1 off: the simulator does not model it), "
        f"{'pre-keyed' if check.prekey else 'no pre-keying'} in both.",
        f"- Tiny Llama ({plan.base.layers} layers, hidden {plan.base.hidden}), LoRA r = 8: "
        f"d = {pred.dim:,} adapter values, {(pred.dim + 1) * 4 / 1000:.0f} kB per masked vector.",
        f"- WAN: {check.latency_ms:.0f} ms one way and {check.bandwidth_mbps:g} Mbit/s per "
        "direction between every agent and the global plane (delaying TCP proxies).",
        f"- {check.windows} windows per run; the first (which also delivers version 0) is left "
        "out; means over the other windows.",
        "",
        "## Result",
        "",
        "| | seconds per window |",
        "|---|---|",
        f"| real, loopback (calibration) | {loopback.mean_window_s:.3f} ± "
        f"{_std(loopback.window_s):.3f} |",
        f"| real, training part (slower boundary) | {loopback.mean_train_s:.3f} ± "
        f"{_std(loopback.train_s):.3f} |",
        f"| simulator at 0 ms (device speed {pred.device_tokens_s:,.0f} tokens/s) | "
        f"{pred.sim_window_0_s:.3f} |",
        f"| fixed service cost per window (real - simulated, loopback) | {pred.overhead_s:.3f} |",
        f"| simulator at {check.latency_ms:.0f} ms | {pred.sim_window_s:.3f} |",
        f"| **prediction** at {check.latency_ms:.0f} ms (simulator + fixed cost) | "
        f"**{pred.window_s:.3f}** |",
        f"| **real** at {check.latency_ms:.0f} ms | **{wan.mean_window_s:.3f} ± "
        f"{_std(wan.window_s):.3f}** |",
        f"| real training part at {check.latency_ms:.0f} ms | {wan.mean_train_s:.3f} ± "
        f"{_std(wan.train_s):.3f} |",
        "",
        f"Prediction error: {error:+.1%} (tolerance ±{check.tolerance:.0%}): "
        f"**{'PASS' if ok else 'FAIL'}**. Latency added {real_delta:.3f} s per real window; the "
        f"simulator predicted {sim_delta:.3f} s.",
        "",
        "Per-window seconds (real): loopback "
        + ", ".join(f"{x:.2f}" for x in loopback.window_s)
        + f"; {check.latency_ms:.0f} ms "
        + ", ".join(f"{x:.2f}" for x in wan.window_s)
        + ".",
        "",
        *communication(plan, loopback, wan),
    ]
    data = {
        "config": asdict(check),
        "loopback": asdict(loopback),
        "wan": asdict(wan),
        "prediction": {**asdict(pred), "window_s": pred.window_s},
        "communication": {
            "loopback_s": loopback.mean_comm_s,
            "wan_s": wan.mean_comm_s,
            "round_trips_counted": wan.mean_round_trips,
            "round_trips_counted_loopback": loopback.mean_round_trips,
            "round_trips_estimate": round_trip_estimate(plan, loopback, wan),
        },
        "error": error,
        "pass": ok,
        "command": command,
    }
    return "\n".join(lines), data, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echelon wan-check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/wan-check.toml"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--root", type=Path, default=Path("var/wan-check"))
    args = parser.parse_args(argv)
    plan = load_plan(args.config)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    command = "echelon wan-check " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    print(f"wan-check: loopback calibration run ({plan.check.windows} windows)", flush=True)
    loopback = run_real(plan, args.root / "loopback", 0.0)
    print(f"  {loopback.mean_window_s:.3f} s per window", flush=True)
    print(f"wan-check: {plan.check.latency_ms:.0f} ms run", flush=True)
    wan = run_real(plan, args.root / f"wan-{plan.check.latency_ms:.0f}ms", plan.check.latency_ms)
    print(f"  {wan.mean_window_s:.3f} s per window", flush=True)
    pred = predict(plan, loopback)
    text, data, ok = report(plan, loopback, wan, pred, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan-check.md").write_text(text, encoding="utf-8")
    (args.out / "wan-check.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(text)
    print(f"wan-check: {time.monotonic() - started:.0f} s; wrote {args.out / 'wan-check.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
