"""Reading a deployment's logs back: round trips counted from the frames an agent recorded,
and tokens/s and idle time over an interval from its pool runs (hand-built logs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echelon_tools.runlogs import TrainingRun, commits, round_trips, throughput, training_runs


def _frame(at: str, direction: str, payload: str, window: int) -> dict[str, object]:
    ours = direction == "sent"
    return {
        "event": "audit_recorded",
        "timestamp": f"2026-01-01T00:00:{at}Z",
        "direction": direction,
        "payload_type": payload,
        "sender": "org-a" if ours else "coordinator",
        "receiver": "coordinator" if ours else "org-a",
        "window": window,
    }


def _write(path: Path, events: list[dict[str, object]]) -> Path:
    lines = [json.dumps(e) for e in events]
    lines.insert(1, "a worker's stray print")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trips_count_each_send_that_waits_for_an_answer(tmp_path: Path) -> None:
    # Version 0, then window 1 in five round trips; window 2 pre-keyed in two (its key round
    # rode on window 1's unmasking) with window 3's key round interleaved, which is not
    # counted; the audit log's own frame ignored.
    frames = [
        _frame("00.0", "received", "GLOBAL_ADAPTER", 1),
        _frame("00.1", "received", "WINDOW_OPEN", 1),
        _frame("00.2", "sent", "KEY_ADVERTISEMENT", 1),
        _frame("00.3", "received", "KEY_ADVERTISEMENT", 1),
        _frame("00.4", "sent", "ENCRYPTED_SHARES", 1),
        _frame("00.5", "received", "ENCRYPTED_SHARES", 1),
        _frame("00.6", "sent", "MASKED_DELTA", 1),
        _frame("00.7", "sent", "WINDOW_METADATA", 1),
        _frame("00.8", "received", "SURVIVOR_LIST", 1),
        _frame("00.9", "sent", "SURVIVOR_SIGNATURE", 1),
        _frame("01.0", "received", "SURVIVOR_SIGNATURE", 1),
        _frame("01.1", "sent", "UNMASKING_SHARES", 1),
        _frame("01.2", "sent", "KEY_ADVERTISEMENT", 2),
        _frame("01.3", "received", "GLOBAL_ADAPTER", 1),
        _frame("01.4", "received", "WINDOW_OPEN", 2),
        _frame("01.5", "sent", "MASKED_DELTA", 2),
        {**_frame("01.5", "sent", "STATUS", 2), "receiver": "audit-log"},
        _frame("01.6", "received", "SURVIVOR_LIST", 2),
        _frame("01.7", "sent", "SURVIVOR_SIGNATURE", 2),
        # window 3's key round, pre-keyed on window 2's messages: not waited on
        _frame("01.75", "received", "KEY_ADVERTISEMENT", 3),
        _frame("01.76", "sent", "ENCRYPTED_SHARES", 3),
        _frame("01.8", "received", "GLOBAL_ADAPTER", 2),
    ]

    counted = round_trips(_write(tmp_path / "org-a.log", list(frames)), "org-a")

    assert counted == {1: 5, 2: 2}


def test_throughput_spreads_a_straddling_run_and_counts_idle_time(tmp_path: Path) -> None:
    runs = [
        TrainingRun("org-a", end=12.0, seconds=4.0, tokens=400),  # half inside [10, 20]
        TrainingRun("org-a", end=18.0, seconds=4.0, tokens=400),
        TrainingRun("org-b", end=20.0, seconds=10.0, tokens=1000),
        TrainingRun("org-b", end=30.0, seconds=5.0, tokens=500),  # after the interval
    ]

    got = throughput(runs, 10.0, 20.0)

    assert got.tokens == pytest.approx(200 + 400 + 1000)
    assert got.tokens_per_s == pytest.approx(160.0)
    assert got.idle == pytest.approx({"org-a": 0.4, "org-b": 0.0})
    assert got.idle_fraction == pytest.approx(0.2)
    with pytest.raises(ValueError, match="start < end"):
        throughput(runs, 20.0, 20.0)


def test_commits_and_training_runs_are_read_with_their_times(tmp_path: Path) -> None:
    coordinator = _write(
        tmp_path / "coordinator.log",
        [
            {"event": "window_done", "timestamp": "2026-01-01T00:00:05Z", "window": 1,
             "committed": True, "seconds": 5.0},
            {"event": "window_done", "timestamp": "2026-01-01T00:00:07Z", "window": 2,
             "committed": False, "seconds": 2.0},
        ],
    )  # fmt: skip
    agent = _write(
        tmp_path / "org-a.log",
        [{"event": "delta_ready", "timestamp": "2026-01-01T00:00:04.5Z", "window": 1,
          "tokens": 256, "train_s": 1.5}],
    )  # fmt: skip

    (commit,) = commits(coordinator)
    (run,) = training_runs(agent, "org-a")

    assert (commit.window, commit.seconds) == (1, 5.0)
    assert run.end - commit.at == pytest.approx(-0.5)
    assert (run.start, run.tokens, run.window) == (pytest.approx(run.end - 1.5), 256, 1)
