"""The window protocol's configuration: every rule's parameters, as both cores take them.

It is derived from the run's declaration; no party takes a parameter from a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from echelon.controller import SyncControllerConfig
from echelon.outer import OuterConfig
from echelon.policy import ExportPolicy
from echelon.protocol.stats import StatRanges
from echelon.secagg import SecAggConfig
from echelon.staleness import StalenessConfig
from echelon.window import WindowConfig


@dataclass(frozen=True, kw_only=True)
class ProtocolConfig:
    """One run's window rules.

    `buffered` (FedBuff): a boundary starts its next cycle as soon as it has submitted,
    without waiting for the window's result. `delay_aware` (Echelon-DA): it keeps training
    while the window is in flight and re-bases that progress onto the new version with
    factor `rebase_carry`. `token_unit` turns tokens into the contribution weight
    `w = tokens / token_unit * s(tau)`, capped at `secagg.max_weight`.
    """

    run_id: str = "run"
    window: WindowConfig = field(default_factory=WindowConfig)
    level2: bool = True
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    controller: SyncControllerConfig | None = None
    policy: ExportPolicy = field(default_factory=ExportPolicy)
    stats: StatRanges = field(default_factory=StatRanges)
    mu: float = 0.0
    buffered: bool = False
    delay_aware: bool = False
    prekey: bool = False  # the next window's key rounds overlap this one's unmasking
    rebase_carry: float = 1.0
    token_unit: float = 1.0
    round_timeout_s: float = 30.0
    join_grace_s: float = 0.0  # a join opens a window this much later, so joins batch
    retry_s: float = 1.0  # wait before opening again after an abort or with no cohort
    windows: int = 0  # the run's length in committed versions; 0 = run until stopped

    def __post_init__(self) -> None:
        if self.buffered and self.delay_aware:
            raise ValueError(
                "ProtocolConfig: buffered and delay_aware both on; want at most one (a buffered "
                "boundary never waits for a window's result, so there is nothing to overlap)"
            )
        if self.prekey and not self.level2:
            raise ValueError("ProtocolConfig.prekey: want level2 on (it pipelines key rounds)")
        if not 0.0 < self.rebase_carry <= 1.0:
            raise ValueError(f"ProtocolConfig.rebase_carry: got {self.rebase_carry}, want (0, 1]")
        if not self.token_unit > 0:
            raise ValueError(f"ProtocolConfig.token_unit: got {self.token_unit}, want > 0")
        if not (self.round_timeout_s > 0 and self.retry_s > 0 and self.join_grace_s >= 0):
            raise ValueError(
                "ProtocolConfig: want round_timeout_s > 0, retry_s > 0 and join_grace_s >= 0"
            )
        if self.mu < 0 or self.windows < 0:
            raise ValueError(f"ProtocolConfig: got mu={self.mu}, windows={self.windows}")

    def graph_seed(self, window: int) -> bytes:
        """The SecAgg+ neighbour graph's seed of `window`, bound to the run."""
        return f"{self.run_id}/{window}".encode()
