"""What the operator metrics count, on hand-made events: worker restarts from the pool's
pid table, secure-aggregation stage timings from where the core stands after each event,
and participation (missed windows in a row, dropouts) from a window's outcome."""

from __future__ import annotations

from prometheus_client import REGISTRY

from echelon.protocol.events import WindowOutcome
from echelon.protocol.rounds import RoundStage
from services.boundary_agent.metrics import WorkerWatch
from services.global_coordinator.metrics import StageClock, participation


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_new_pid_for_a_shard_is_a_restart() -> None:
    before = sample("echelon_agent_worker_restarts_total")
    watch = WorkerWatch()
    watch.look({0: 100, 1: 101}, alive=2)
    watch.look({0: 100, 1: 101}, alive=2)
    assert sample("echelon_agent_worker_restarts_total") == before
    watch.look({0: 100}, alive=1)  # shard 1 died and was dropped
    assert sample("echelon_agent_alive_workers") == 1
    watch.look({0: 100, 1: 102}, alive=2)  # and was started again
    watch.look({0: 103, 1: 102}, alive=2)  # shard 0 died and came back in one window
    assert sample("echelon_agent_worker_restarts_total") == before + 2
    assert sample("echelon_agent_alive_workers") == 2


def test_each_stage_is_timed_from_entering_it_to_leaving_it() -> None:
    def total(stage: str) -> tuple[float, float]:
        name = "echelon_coordinator_secagg_stage_seconds"
        return sample(f"{name}_sum", stage=stage), sample(f"{name}_count", stage=stage)

    keys, shares = total("keys"), total("shares")
    clock = StageClock()
    clock.seen(7, RoundStage.KEYS, now=10.0)
    clock.seen(7, RoundStage.KEYS, now=11.0)  # still there: nothing observed
    assert total("keys") == keys
    clock.seen(7, RoundStage.SHARES, now=12.5)
    assert total("keys") == (keys[0] + 2.5, keys[1] + 1)
    clock.ended(7, now=13.0)
    assert total("shares") == (shares[0] + 0.5, shares[1] + 1)
    clock.ended(7, now=14.0)  # a window ends once
    assert total("shares") == (shares[0] + 0.5, shares[1] + 1)


def test_missed_windows_count_in_a_row_and_reset_on_a_contribution() -> None:
    dropouts = sample("echelon_coordinator_dropouts_total")
    missed = "echelon_coordinator_boundary_missed_windows"
    first = WindowOutcome(
        window=1,
        committed=True,
        reason="",
        version=1,
        contributors=("p-a", "p-b"),
        failed=(("p-c", "session broken"),),
    )
    participation(first, ["p-a", "p-b", "p-c", "p-d"])
    aborted = WindowOutcome(window=2, committed=False, reason="too few", version=1)
    participation(aborted, ["p-a", "p-b", "p-c", "p-d"])
    third = WindowOutcome(window=3, committed=True, reason="", version=2, contributors=("p-c",))
    participation(third, ["p-a", "p-b", "p-c", "p-d"])
    assert [sample(missed, boundary=b) for b in ("p-a", "p-b", "p-c", "p-d")] == [2, 2, 0, 3]
    assert sample("echelon_coordinator_dropouts_total") == dropouts + 1
    contributions = "echelon_coordinator_boundary_contributions_total"
    assert sample(contributions, boundary="p-c") == 1
    assert sample(contributions, boundary="p-a") == 1
