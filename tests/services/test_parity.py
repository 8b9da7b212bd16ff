"""Parity: the simulator's executor and the real services (agents dialing out to the
coordinator over gRPC) run the same protocol cores, so a scripted scenario gives, window
by window, the same outcome and reason, the same contributors and the same SHA-256 of
every global version. Stochastic rounding is seeded from (run, window, party) and the
deltas are fixed (tests/protocol/harness.py); the services' timing is gated on protocol
events where the simulator's comes from virtual compute time. The mutation test changes
one rule in one executor only and shows the comparison catches it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from echelon.protocol import ProtocolConfig
from echelon.protocol.events import Train
from echelon.protocol.messages import Message, SurvivorsSigned, ToCoordinator
from echelon.staleness import StalenessConfig, StalenessKind
from services.common.wire import vector_sha256
from tests.protocol.harness import make_world, protocol_config
from tests.services.sessions import Sites, start_sites

pytestmark = pytest.mark.timeout(120)

Row = tuple[int, bool, str, tuple[str, ...], str]


@dataclass(frozen=True)
class Scenario:
    name: str
    config: ProtocolConfig
    names: tuple[str, ...] = ("org-a", "org-b", "org-c")
    # boundary -> virtual seconds of each training run that the services hold (others: 1 s)
    sim_seconds: dict[str, float] = field(default_factory=dict)
    # boundary -> (is this training held?, until when)
    hold: dict[str, tuple[Callable[[Train], bool], Callable[[Sites], bool]]] = field(
        default_factory=dict
    )
    fault: Callable[[str, ToCoordinator], ToCoordinator | None] | None = None


def first_run(command: Train) -> bool:
    return command.version == 0 and command.fresh


def drop_b_signature(boundary: str, message: ToCoordinator) -> ToCoordinator | None:
    if boundary == "org-b" and isinstance(message, SurvivorsSigned) and message.window == 1:
        return None  # org-b drops out after its masked vector is in
    return message


def committed(n: int) -> Callable[[Sites], bool]:
    return lambda sites: len(sites.coordinator.outcomes) >= n


# A window opens only with the whole federation joined, so that the first cohort does not
# depend on which agent's session came up first.
BASE = protocol_config(
    window=replace(protocol_config().window, deadline_s=3.0, min_cohort=3), round_timeout_s=2.0
)
PAIR = replace(BASE, window=replace(BASE.window, min_cohort=2))
SCENARIOS = [
    Scenario("sync", BASE),
    Scenario(
        "late",
        BASE,
        sim_seconds={"org-c": 5.0},
        hold={"org-c": (first_run, committed(1))},
    ),
    Scenario("dropout-after-masking", BASE, fault=drop_b_signature),
    Scenario(
        "fedbuff-stale",
        replace(BASE, buffered=True, window=replace(BASE.window, buffer_k=2), windows=2),
        sim_seconds={"org-c": 50.0},
        hold={"org-c": (first_run, committed(2))},
    ),
    Scenario("echelon-da", replace(PAIR, delay_aware=True), names=("org-a", "org-b")),
]


def simulated(scenario: Scenario, config: ProtocolConfig | None = None) -> list[Row]:
    fault = scenario.fault

    def sim_fault(sender: str, receiver: str, message: Message) -> Message | None:
        if fault is None or not isinstance(message, ToCoordinator):
            return message
        return fault(sender, message)

    def seconds(boundary: str, slow: float) -> Callable[[Train], float]:
        held = scenario.hold.get(boundary)
        return lambda command: slow if held is None or held[0](command) else 1.0

    world = make_world(
        scenario.names,
        config=config or scenario.config,
        seconds={b: seconds(b, s) for b, s in scenario.sim_seconds.items()},
        fault=sim_fault,
    )
    trace = world.run()
    digests = {c.version: vector_sha256(c.phi).hex() for c in trace.commits}
    return [
        (
            o.window,
            o.committed,
            o.reason,
            o.contributors,
            digests.get(o.version, "") if o.committed else "",
        )
        for o in trace.outcomes
    ]


def served(scenario: Scenario, config: ProtocolConfig | None = None) -> list[Row]:
    def gate(sites: Sites, boundary: str, command: Train) -> None:
        rule = scenario.hold.get(boundary)
        if rule is not None and rule[0](command):
            assert sites.coordinator.wait(lambda: rule[1](sites), 60.0), "gate never opened"

    sites = start_sites(config or scenario.config, scenario.names, gate=gate, fault=scenario.fault)
    try:
        assert sites.run(90.0), f"{scenario.name}: the services did not finish"
        digests = dict(sites.coordinator.versions)
        return [
            (
                o.window,
                o.committed,
                o.reason,
                o.contributors,
                digests[o.version].hex() if o.committed else "",
            )
            for o in sites.coordinator.outcomes
        ]
    finally:
        sites.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_simulator_and_services_agree_window_by_window(scenario: Scenario) -> None:
    sim = simulated(scenario)
    real = served(scenario)
    assert sim == real
    assert all(row[1] for row in sim), sim  # every scenario window commits


def test_a_rule_changed_in_one_executor_only_breaks_parity() -> None:
    late = SCENARIOS[1]
    mutated = replace(
        late.config, staleness=StalenessConfig(kind=StalenessKind.POLYNOMIAL, a=0.75, tau_max=4)
    )
    sim = simulated(late)
    real = served(late, mutated)
    assert [r[:4] for r in sim] == [r[:4] for r in real]  # the same windows and members ...
    assert [r[4] for r in sim] != [r[4] for r in real]  # ... but other versions
