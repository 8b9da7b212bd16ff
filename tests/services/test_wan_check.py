"""The real-latency check, reduced: two real deployments (loopback and 100 ms through the
delaying proxies) and the simulator's calibrated prediction, written as a report.

Timing is not asserted against a tolerance here (that is the check's own verdict, reported
by `echelon wan-check`); the test checks that every number in the report is measured."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean

import pytest

from echelon.sim.base import BaseConfig
from echelon.sim.data import CorpusConfig
from echelon_tools.wancheck import CheckConfig, CheckPlan, load_plan, main

pytestmark = pytest.mark.timeout(600)


def test_reduced_wan_check_measures_both_runs_and_predicts(tmp_path: Path) -> None:
    config = tmp_path / "check.toml"
    config.write_text(
        f"""
[check]
latency_ms = 100.0
bandwidth_mbps = 20.0
windows = 3
inner_steps = 4
workers = 2
batch_size = 2
max_tokens_per_file = 20000

[corpus]
cache_dir = "{tmp_path / "corpus"}"
work_dir = "{tmp_path / "sim"}"
domains = ["stdlib-a", "stdlib-b"]
bytes_per_domain = 30000
vocab_size = 320
seq_len = 32
val_blocks_per_domain = 4

[base]
layers = 1
hidden = 32
heads = 2
intermediate = 64
pretrain_steps = 0
""",
        encoding="utf-8",
    )
    out = tmp_path / "out"

    code = main(["--config", str(config), "--out", str(out), "--root", str(tmp_path / "run")])

    data = json.loads((out / "wan-check.json").read_text(encoding="utf-8"))
    assert code == (0 if data["pass"] else 1)
    loopback, wan, pred = data["loopback"], data["wan"], data["prediction"]
    assert len(loopback["window_s"]) == len(wan["window_s"]) == 2
    assert all(s > 0 for s in loopback["train_s"] + wan["train_s"])
    # 100 ms one way on a protocol of three sequential round trips per window (pre-keyed).
    assert fmean(wan["window_s"]) > fmean(loopback["window_s"]) + 2 * 0.2
    assert pred["sim_window_s"] > pred["sim_window_0_s"] + 2 * 0.2
    assert pred["window_s"] == pytest.approx(pred["sim_window_s"] + pred["overhead_s"])
    # Round trips counted from the agents' frames where a delivery was logged (the last one
    # may come after an agent stopped): pre-keyed, the same three at both latencies.
    assert 1 <= len(wan["round_trips"]) <= 2 and 1 <= len(loopback["round_trips"]) <= 2
    assert set(wan["round_trips"]) == set(loopback["round_trips"]) == {3}
    comm = data["communication"]
    assert comm["wan_s"] == pytest.approx(fmean(wan["window_s"]) - fmean(wan["train_s"]))
    assert comm["round_trips_estimate"] == pytest.approx(
        (fmean(wan["window_s"]) - fmean(loopback["window_s"])) / 0.2
    )
    report = (out / "wan-check.md").read_text(encoding="utf-8")
    assert "| **real** at 100 ms |" in report and "Prediction error:" in report
    assert "| **round trips** to the coordinator, counted |" in report


def test_check_config_rejects_what_cannot_be_measured(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        CheckConfig(latency_ms=0.0)
    with pytest.raises(ValueError, match="windows >= 3"):
        CheckConfig(windows=2)
    config = tmp_path / "c.toml"
    config.write_text("[check]\nwindows = 4\n", encoding="utf-8")
    assert load_plan(config) == CheckPlan(
        check=CheckConfig(windows=4), corpus=CorpusConfig(), base=BaseConfig()
    )
