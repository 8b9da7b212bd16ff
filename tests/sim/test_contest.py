"""A reduced contest, end to end through the CLI entry: tables, CSV and plots are written."""

from __future__ import annotations

from pathlib import Path

from echelon.sim.config import World
from echelon_tools.contest import grid_points, main
from tests.sim.conftest import tiny_corpus


def test_grid_points_expand_outer_pairs() -> None:
    points = grid_points({"inner_lr": [1e-3, 2e-3], "outer": [[0.7, 0.9]]})

    assert points == [
        {"inner_lr": 1e-3, "outer_lr": 0.7, "outer_momentum": 0.9},
        {"inner_lr": 2e-3, "outer_lr": 0.7, "outer_momentum": 0.9},
    ]


def test_reduced_contest_writes_its_results(tmp_path: Path, world_root: Path, world: World) -> None:
    # The smoke config's corpus and base are the tiny world's: its caches are reused.
    corpus = tiny_corpus(world_root)
    smoke = Path("configs/contest/smoke.toml").read_text(encoding="utf-8")
    config = tmp_path / "smoke.toml"
    config.write_text(
        smoke.replace(
            "[corpus]\n",
            f'[corpus]\ncache_dir = "{corpus.cache_dir}"\nwork_dir = "{corpus.work_dir}"\n',
        ),
        encoding="utf-8",
    )
    out = tmp_path / "results"

    assert main(["--config", str(config), "--out", str(out)]) == 0

    table = (out / "contest.md").read_text(encoding="utf-8")
    assert "| echelon-da |" in table and "| diloco-sa |" in table
    assert "## Stress runs" in table and "latency 200 ms" in table
    assert f"--config {config}" in table
    for name in (
        "contest.csv",
        "stress.csv",
        "loss_vs_tokens.png",
        "loss_vs_bytes.png",
        "loss_vs_wall_s.png",
        "stress.png",
        "runs.json",
    ):
        assert (out / name).stat().st_size > 0
    assert main(["--config", str(config), "--out", str(out), "--report-only"]) == 0
