"""The end-to-end benchmark, reduced: one round of two real deployments (loopback and 50 ms
through the delaying proxies), each followed by the no-synchronization baseline of the same
workers, in one run; and the pairing of deployments with their neighbouring baselines.

No time is asserted (the ratios are the benchmark's report, not a test verdict); the test
checks that every figure is computed from the runs' own logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_e2e import Measured, main, paired
from echelon_tools.runlogs import Throughput, commits, training_runs

pytestmark = pytest.mark.timeout(600)


def test_reduced_bench_measures_each_deployment_against_its_baselines(tmp_path: Path) -> None:
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
rounds = 1

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
    after_loop, after_wan = (b["tokens_per_s"] for b in base["runs"])
    assert base["tokens_per_s"] == pytest.approx((after_loop + after_wan) / 2)  # the median
    tokens_per_run = 4 * 2 * 32 * 2  # steps x batch x seq_len x workers
    # The order run: loopback, baseline, WAN, baseline.
    neighbours = {"loopback": after_loop, "wan": (after_loop + after_wan) / 2}
    for key, target in (("loopback", 0.95), ("wan", 0.90)):
        got = data[key]
        assert got["target"] == target
        (run,) = got["runs"]
        assert run["ratio"] == pytest.approx(run["tokens_per_s"] / neighbours[key])
        assert got["ratios"] == [run["ratio"]] and got["ratio"] == run["ratio"]
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
        assert 0.0 <= run["idle_fraction"] <= 1.0
        # Windows 2..3 of the four the coordinator ran (the first is warm-up, one more after).
        logs = root / f"{key}-1" / "logs"
        done = commits(logs / "coordinator.log")
        assert len(done) >= 4
        assert run["window_s"] == [c.seconds for c in done[1:3]]
        assert run["seconds"] == pytest.approx(done[2].at - done[0].at)
        runs = [r for b in ("org-a", "org-b") for r in training_runs(logs / f"{b}.log", b)]
        assert {r.tokens for r in runs} == {tokens_per_run}
        assert 0 < run["tokens"] <= sum(r.tokens for r in runs)
    assert (root / "baseline-wan-1" / "logs").is_dir()


def _measured(tokens_per_s: float) -> Measured:
    rate = Throughput(start=0.0, end=10.0, tokens=tokens_per_s * 10.0, idle={})
    return Measured("run", rate, (), ())


def test_each_deployment_is_paired_with_the_baselines_on_either_side() -> None:
    sequence = [
        ("loopback", _measured(90.0)),
        ("baseline", _measured(100.0)),
        ("wan", _measured(84.0)),
        ("baseline", _measured(110.0)),
        ("loopback", _measured(114.0)),
        ("baseline", _measured(130.0)),
    ]

    pairs = paired(sequence)

    assert [(p.kind, round(p.ratio, 6)) for p in pairs] == [
        ("loopback", 0.9),  # the first has a baseline after it only
        ("wan", round(84.0 / 105.0, 6)),
        ("loopback", round(114.0 / 120.0, 6)),
    ]
