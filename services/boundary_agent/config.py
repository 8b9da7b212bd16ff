"""The boundary agent's [agent] table; its [service] table is `services.common.settings`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """[agent]: the organization this agent speaks for, and how it reconnects.

    The coordinator it dials out to is [service].coordinator, like every address."""

    boundary: str = ""  # required; "" so that its absence gets the message below
    reconnect_max_s: float = 10.0  # longest pause between reconnection attempts

    def __post_init__(self) -> None:
        if not self.boundary:
            raise ValueError(
                "[agent].boundary: missing, want the organization's id, e.g. 'org-a' "
                "(in the file, ECHELON_BOUNDARY or --boundary)"
            )
        if not self.reconnect_max_s > 0:
            raise ValueError(f"[agent].reconnect_max_s: got {self.reconnect_max_s}, want > 0")
