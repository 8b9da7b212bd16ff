"""PNG plots of the contest: held-out loss against tokens, bytes crossing boundaries and
simulated wall-clock (mean +- std over seeds), and the stress runs' bars (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from echelon_tools.contest_report import AXIS_TITLES, ContestReport, row_order, runs_of


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(report: ContestReport, axis: str, path: Path) -> None:
    """Mean +- std over seeds of the held-out loss against `axis`, one line per row."""
    plt = _pyplot()
    by = {(s.strategy, s.axis): s for s in report.selections}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = sorted({k.split("|")[1] for k in report.finals}, key=row_order(report))
    for row in rows:
        base = row.removesuffix("+frozen-A")
        runs = runs_of(report.finals, row, by[(base, "tokens")].label)
        top = min(float(getattr(r.points[-1], axis)) for r in runs)
        grid = np.linspace(0.0, top, 60)
        ys = np.array(
            [
                np.interp(
                    grid, [float(getattr(p, axis)) for p in r.points], [p.loss for p in r.points]
                )
                for r in runs
            ]
        )
        mean, std = ys.mean(axis=0), ys.std(axis=0)
        style = "--" if row.endswith("frozen-A") else "-"
        ax.plot(grid, mean, style, label=row, linewidth=1.6)
        ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel(AXIS_TITLES[axis])
    ax.set_ylabel("held-out loss")
    if axis != "tokens":
        ax.set_xscale("symlog", linthresh=max(1.0, report.budgets.get(axis) / 50))
    ax.axvline(report.budgets.get(axis), color="grey", linewidth=0.8, linestyle=":")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stress_bars(stress: list[dict[str, Any]], path: Path) -> None:
    """Loss change against the ideal setting and time to target, per setting and strategy."""
    plt = _pyplot()
    settings = list(dict.fromkeys(s["setting"] for s in stress))
    names = list(dict.fromkeys(s["strategy"] for s in stress))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = {s["setting"]: s for s in stress if s["strategy"] == name}
        x = np.arange(len(settings)) + i * width
        ax1.bar(x, [rows[s]["degradation_pct"] for s in settings], width, label=name)
        ax2.bar(x, [rows[s]["time_to_target_s"] for s in settings], width, label=name)
    for ax, title in ((ax1, "loss vs ideal (%)"), (ax2, "time to target (s)")):
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
