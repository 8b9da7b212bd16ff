"""The end-to-end benchmark, reduced: two real deployments (loopback and 50 ms through the
delaying proxies) and the no-synchronization baseline of the same workers, in one run.

No time is asserted (the ratios are the benchmark's report, not a test verdict); the test
checks that every figure is computed from the runs' own logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_e2e import main
from echelon_tools.runlogs import commits, training_runs

pytestmark = pytest.mark.timeout(600)


def test_reduced_bench_measures_three_runs_against_one_baseline(tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(
        f"""
[check]
latency_ms = 50.0
bandwidth_mbps = 20.0
windows = 3
inner_steps = 4
workers = 2
batch_size = 2
max_tokens_per_file = 20000

[e2e]
delay_aware = true

[corpus]
cache_dir = "{tmp_path / "corpus"}"
work_dir = "{tmp_path / "sim"}"
domains = ["stdlib-a", "stdlib-b"]
bytes_per_domain = 30000
vocab_size = 320
seq_len = 32

[base]
layers = 1
hidden = 32
heads = 2
intermediate = 64
pretrain_steps = 0
""",
        encoding="utf-8",
    )
    out, root = tmp_path / "e2e.json", tmp_path / "runs"

    code = main(["--config", str(config), "--json", str(out), "--root", str(root)])

    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    base = data["baseline"]
    # Back to back: the pools idle only between one run and the next.
    assert len(base["runs"]) == 2 and all(b["idle_fraction"] < 0.1 for b in base["runs"])
    assert base["tokens_per_s"] == pytest.approx(sum(b["tokens_per_s"] for b in base["runs"]) / 2)
    tokens_per_run = 4 * 2 * 32 * 2  # steps x batch x seq_len x workers
    for key, run_dir, target in (("loopback", "loopback", 0.95), ("wan", "wan", 0.90)):
        got = data[key]
        assert got["target"] == target
        assert got["ratio"] == pytest.approx(got["tokens_per_s"] / base["tokens_per_s"])
        assert got["tokens_per_s"] == pytest.approx(got["tokens"] / got["seconds"])
        assert 0.0 <= got["idle_fraction"] <= 1.0
        # Windows 2..3 of the four the coordinator ran (the first is warm-up, one more after).
        logs = root / run_dir / "logs"
        done = commits(logs / "coordinator.log")
        assert len(done) >= 4
        assert got["window_s"] == [c.seconds for c in done[1:3]]
        assert got["seconds"] == pytest.approx(done[2].at - done[0].at)
        runs = [r for b in ("org-a", "org-b") for r in training_runs(logs / f"{b}.log", b)]
        assert {r.tokens for r in runs} == {tokens_per_run}
        assert 0 < got["tokens"] <= sum(r.tokens for r in runs)
    assert data["wan"]["window_s"][0] > 0 and (root / "baseline-2" / "logs").is_dir()
