"""The contest's outputs: the budget table (Markdown and CSV), the stress table, the checked
aims, and `runs.json` (every trajectory, so the report can be rebuilt). Pure formatting of
finished runs; `contest.write_report` writes the files, and the plots (`contest_plots`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echelon.sim.config import SimConfig
from echelon.sim.results import Point, RunResult, time_to_target, value_at

AXIS_TITLES = {"tokens": "tokens", "bytes": "bytes", "wall_s": "wall-clock (s)", "syncs": "syncs"}


@dataclass(frozen=True)
class Budgets:
    tokens: float
    bytes: float
    wall_s: float
    syncs: float

    def get(self, axis: str) -> float:
        return float(getattr(self, axis))


@dataclass(frozen=True, kw_only=True)
class Selection:
    strategy: str
    axis: str
    point: dict[str, Any]
    label: str


@dataclass(frozen=True, kw_only=True)
class ContestReport:
    command: str
    config_path: str
    config_text: str
    budgets: Budgets
    selections: list[Selection]
    tuned: Mapping[str, RunResult]
    finals: Mapping[str, RunResult]
    stress: Mapping[str, RunResult]
    stress_settings: list[str]
    seconds: float
    sim: SimConfig
    grid: dict[str, Any]


def runs_of(finals: Mapping[str, RunResult], row: str, label: str) -> list[RunResult]:
    return [r for k, r in finals.items() if k.split("|")[1] == row and k.split("|")[2] == label]


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    values: tuple[float, ...]
    label: str


def budget_cells(report: ContestReport) -> dict[str, dict[str, Cell]]:
    """rows (strategy, or strategy+frozen-A) -> axis -> mean/std over seeds."""
    rows: dict[str, dict[str, Cell]] = {}
    by = {(s.strategy, s.axis): s for s in report.selections}
    names = sorted({k.split("|")[1] for k in report.finals}, key=row_order(report))
    for row in names:
        base = row.removesuffix("+frozen-A")
        rows[row] = {}
        for axis in AXIS_TITLES:
            sel = by[(base, "tokens" if row != base else axis)]
            runs = runs_of(report.finals, row, sel.label)
            vals = tuple(value_at(r, axis, report.budgets.get(axis)) for r in runs)
            rows[row][axis] = Cell(float(np.mean(vals)), float(np.std(vals)), vals, sel.label)
    return rows


def row_order(report: ContestReport) -> Any:
    first = [s.strategy for s in report.selections]

    def key(row: str) -> tuple[int, str]:
        base = row.removesuffix("+frozen-A")
        return (first.index(base) if base in first else 99, row)

    return key


def _best(cells: Mapping[str, Cell]) -> tuple[str, set[str]]:
    best = min(cells, key=lambda r: cells[r].mean)
    tied = {r for r, c in cells.items() if c.mean - cells[best].mean <= max(c.std, cells[best].std)}
    return best, tied


def stress_rows(report: ContestReport) -> list[dict[str, Any]]:
    """Per setting and strategy: final loss, degradation vs ideal, tokens/s, time-to-target."""
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for key, r in report.stress.items():
        _, setting, name, _ = key.split("|")
        groups.setdefault((setting, name), []).append(r)
    ideal = {
        n: float(np.mean([r.points[-1].loss for r in rs]))
        for (s, n), rs in groups.items()
        if s == "ideal"
    }
    for setting in report.stress_settings:
        in_setting = {n: rs for (s, n), rs in groups.items() if s == setting}
        if not in_setting:
            continue
        target = max(r.points[-1].loss for rs in in_setting.values() for r in rs)
        for name, rs in in_setting.items():
            final = [r.points[-1].loss for r in rs]
            t2t = [time_to_target(r, target) for r in rs]
            share = [float(np.mean([p.comm_share for p in r.points[1:]] or [0.0])) for r in rs]
            out.append(
                {
                    "setting": setting,
                    "strategy": name,
                    "loss_mean": float(np.mean(final)),
                    "loss_std": float(np.std(final)),
                    "degradation_pct": 100.0 * (float(np.mean(final)) / ideal[name] - 1.0)
                    if name in ideal
                    else math.nan,
                    "tokens_per_s": float(
                        np.mean([r.points[-1].tokens / r.points[-1].wall_s for r in rs])
                    ),
                    "target_loss": target,
                    "time_to_target_s": float(np.mean(t2t)),
                    "comm_share": float(np.mean(share)),
                    "syncs": float(np.mean([r.points[-1].syncs for r in rs])),
                }
            )
    return out


#: The rows the aims are checked for: Echelon and Echelon-DA, pre-keyed as the services run
#: them.
ECHELONS = ("echelon", "echelon-da")


def aims(report: ContestReport, stress: list[dict[str, Any]]) -> list[str]:
    """The issue's aims, checked against the numbers (whatever they say)."""
    lines: list[str] = []
    cells = budget_cells(report)
    for name in ECHELONS:
        if name not in cells:
            continue
        verdicts = []
        for axis in AXIS_TITLES:
            best, tied = _best({r: cells[r][axis] for r in cells})
            gap = cells[name][axis].mean - cells[best][axis].mean
            word = "best" if best == name else ("tied-best" if name in tied else "behind")
            verdicts.append(
                f"{AXIS_TITLES[axis]}: {word}"
                + (f" (+{gap:.4f} vs {best})" if word == "behind" else "")
            )
        lines.append(f"- {name}: " + "; ".join(verdicts) + ".")
    rows = {(s["setting"], s["strategy"]): s for s in stress}
    for setting in ("latency 200 ms", "non-IID severe"):
        for name in ECHELONS:
            row = rows.get((setting, name))
            if row is not None:
                ok = "within" if row["degradation_pct"] <= 2.0 else "beyond"
                pct = row["degradation_pct"]
                lines.append(f"- {name} at {setting}: {pct:+.2f}% vs ideal ({ok} the 2% aim).")
    sa = rows.get(("latency 200 ms", "diloco-sa"))
    for name in ECHELONS[1:]:
        da = rows.get(("latency 200 ms", name))
        if da is None or sa is None or sa["time_to_target_s"] <= 0:
            continue
        ratio = da["time_to_target_s"] / sa["time_to_target_s"]
        lines.append(
            f"- {name} time-to-target at 200 ms: {da['time_to_target_s']:.2f} s vs DiLoCo+SA "
            f"{sa['time_to_target_s']:.2f} s = {ratio:.2f}x (aim <= 0.7x); communication is "
            f"{sa['comm_share']:.0%} of a DiLoCo+SA window there (aim >= 30%)."
        )
    return lines


def _fmt(c: Cell, best: bool, tied: bool) -> str:
    text = f"{c.mean:.4f} ± {c.std:.4f}"
    return f"**{text}**" if best else (f"*{text}*" if tied else text)


def markdown(report: ContestReport, stress: list[dict[str, Any]]) -> str:
    cells = budget_cells(report)
    b = report.budgets
    sim = report.sim
    lines = [
        "# Echelon contest results",
        "",
        f"Produced by `{report.command}` in {report.seconds / 60:.1f} min "
        f"(config `{report.config_path}`, reproduced below).",
        "",
        "## Setting",
        "",
        f"- {sim.boundaries} boundaries x {sim.devices} devices, device speed "
        f"{sim.device_tokens_s:g} tokens/s x {list(sim.speeds)}, batch {sim.batch_size}, "
        f"LoRA r={sim.lora_r}; link {sim.link.latency_s * 1e3:g} ms one way, "
        f"{sim.link.bandwidth_mbps:g} Mbit/s; data skew {sim.partition.skew.value} "
        f"(alpha {sim.partition.alpha:g}); churn {sim.faults.churn:.0%}.",
        f"- Budgets (the least any exchanging tuning run spent): tokens {b.tokens:,.0f}, "
        f"bytes {b.bytes:,.0f}, wall-clock {b.wall_s:.2f} s, syncs {b.syncs:g}.",
        "- Cells: held-out loss of the global model (mean ± std over seeds "
        f"{sorted({k.split('|')[3] for k in report.finals})}), interpolated between versions "
        "at the budget; **bold** best, *italic* tied-best (within one std).",
        "- Each strategy uses, per budget, the grid point with the best tuning-seed loss at "
        "that budget; frozen-A rows use the tokens-budget point.",
        "",
        "## Budget-matched comparison",
        "",
        "| strategy | fixed tokens | fixed bytes | fixed wall-clock | fixed syncs |",
        "|---|---|---|---|---|",
    ]
    axes = list(AXIS_TITLES)
    winners = {a: _best({r: cells[r][a] for r in cells}) for a in axes}
    for row, by_axis in cells.items():
        parts = [_fmt(by_axis[a], row == winners[a][0], row in winners[a][1]) for a in axes]
        lines.append(f"| {row} | " + " | ".join(parts) + " |")
    lines += ["", "Grid points chosen (per budget):", ""]
    for sel in report.selections:
        lines.append(f"- {sel.strategy} @ {sel.axis}: `{sel.label}`")
    if stress:
        lines += [
            "",
            "## Stress runs",
            "",
            "One factor at a time from the ideal setting (0 ms, IID, no churn); loss at the "
            "token budget; time-to-target is the first simulated time the global loss reaches "
            "the worst final loss of the setting.",
            "",
            "| setting | strategy | loss | vs ideal | tokens/s | time-to-target (s) | "
            "comm share | syncs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in stress:
            lines.append(
                f"| {s['setting']} | {s['strategy']} | {s['loss_mean']:.4f} ± "
                f"{s['loss_std']:.4f} | {s['degradation_pct']:+.2f}% | "
                f"{s['tokens_per_s']:,.0f} | {s['time_to_target_s']:.2f} | "
                f"{s['comm_share']:.0%} | {s['syncs']:.1f} |"
            )
    lines += ["", "## Aims, checked", "", *aims(report, stress)]
    lines += [
        "",
        "Plots: `loss_vs_tokens.png`, `loss_vs_bytes.png`, `loss_vs_wall_s.png`"
        + (", `stress.png`" if stress else "")
        + "; raw numbers in `contest.csv`"
        + (", `stress.csv`" if stress else "")
        + ".",
        "",
        "## Configuration",
        "",
        "```toml",
        report.config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _runs_json(runs: Mapping[str, RunResult]) -> dict[str, Any]:
    return {
        k: {
            "strategy": r.strategy,
            "seed": r.seed,
            "points": [dataclasses.asdict(p) for p in r.points],
        }
        for k, r in runs.items()
    }


def _runs_from(raw: Mapping[str, Any]) -> dict[str, RunResult]:
    return {
        k: RunResult(v["strategy"], int(v["seed"]), tuple(Point(**p) for p in v["points"]))
        for k, v in raw.items()
    }


def save_runs(report: ContestReport, path: Path) -> None:
    """Every run's trajectory and the contest's decisions, to rebuild the report later."""
    data = {
        "command": report.command,
        "config_path": report.config_path,
        "config_text": report.config_text,
        "budgets": dataclasses.asdict(report.budgets),
        "selections": [dataclasses.asdict(s) for s in report.selections],
        "tuned": _runs_json(report.tuned),
        "finals": _runs_json(report.finals),
        "stress": _runs_json(report.stress),
        "stress_settings": report.stress_settings,
        "seconds": report.seconds,
        "grid": report.grid,
    }
    path.write_text(json.dumps(data), encoding="utf-8")


def load_runs(path: Path, sim: SimConfig) -> ContestReport:
    data = json.loads(path.read_text(encoding="utf-8"))
    return ContestReport(
        command=data["command"],
        config_path=data["config_path"],
        config_text=data["config_text"],
        budgets=Budgets(**data["budgets"]),
        selections=[Selection(**s) for s in data["selections"]],
        tuned=_runs_from(data["tuned"]),
        finals=_runs_from(data["finals"]),
        stress=_runs_from(data["stress"]),
        stress_settings=list(data["stress_settings"]),
        seconds=float(data["seconds"]),
        sim=sim,
        grid=data["grid"],
    )
