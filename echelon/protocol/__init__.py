"""The window protocol, written once: sans-IO cores for the coordinator and the boundary
agents, the secure-aggregation round runner, and the messages, events and commands between
them. The simulator (`echelon.sim.executor`) and the services execute the same cores."""

from echelon.protocol.boundary import BoundaryCore
from echelon.protocol.config import ProtocolConfig
from echelon.protocol.coordinator import CoordinatorCore, CoordinatorState
from echelon.protocol.events import COORDINATOR, TrainedDelta, WindowOutcome
from echelon.protocol.rounds import AggregatorRounds, PartyRounds, RoundStage

__all__ = [
    "COORDINATOR",
    "AggregatorRounds",
    "BoundaryCore",
    "CoordinatorCore",
    "CoordinatorState",
    "PartyRounds",
    "ProtocolConfig",
    "RoundStage",
    "TrainedDelta",
    "WindowOutcome",
]
