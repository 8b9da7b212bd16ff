"""A blocking driver of one secure-aggregation round (`echelon.protocol.rounds`) over a
`RoundTransport`, for an executor without an event loop: the agent's level-1 aggregation
over its workers' control pipes. The round's rules stay in `AggregatorRounds`; this module
only moves its messages and turns a stage's silence into `expire()` at its deadline."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from echelon.protocol.rounds import (
    AggregatorRounds,
    Outbound,
    PartyMessage,
    RoundReply,
    RoundStage,
)


class RoundTransport(Protocol):
    """What a blocking executor carries a round's messages over (level 1: device pipes)."""

    def send(self, party: int, message: RoundReply) -> bool:
        """Sends `message` to `party`; False when the party cannot be reached."""
        ...

    def receive(
        self, waiting: frozenset[int], deadline: float
    ) -> tuple[int, PartyMessage | str] | None:
        """The next thing one of `waiting` sent: a round message, or why that party failed
        (gone, or it sent something that is no round message); None at `deadline` (a
        `time.monotonic()` value)."""
        ...


def run_rounds(
    rounds: AggregatorRounds,
    transport: RoundTransport,
    outbound: Sequence[Outbound],
    *,
    stage_timeout_s: float,
) -> None:
    """Sends `outbound`, then feeds what arrives into `rounds` and sends its answers, until
    the round reaches collection (which its owner runs) or ends. A stage that is not complete
    `stage_timeout_s` after it began expires. Never raises for a party's failure."""
    queue = deque(outbound)
    stage, deadline = rounds.stage, time.monotonic() + stage_timeout_s
    while True:
        while queue:
            out = queue.popleft()
            if out.party not in rounds.failed and not transport.send(out.party, out.message):
                queue.extend(rounds.fail(out.party, f"unreachable: {type(out.message).__name__}"))
        if rounds.finished or rounds.stage is RoundStage.COLLECT:
            return
        if rounds.stage is not stage:
            stage, deadline = rounds.stage, time.monotonic() + stage_timeout_s
        waiting = rounds.awaiting
        got = transport.receive(waiting, deadline) if waiting else None
        if got is None:
            queue.extend(rounds.expire())
            continue
        party, what = got
        queue.extend(
            rounds.fail(party, what) if isinstance(what, str) else rounds.receive(party, what)
        )
