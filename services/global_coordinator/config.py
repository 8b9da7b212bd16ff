"""Configuration of the coordinator: the run it declares and how it drives windows."""

from __future__ import annotations

from dataclasses import dataclass, field

from echelon.audit.policy import PayloadAllowList, Policy
from echelon.controller import SyncControllerConfig
from echelon.declaration import (
    DEFAULT_TOKEN_UNIT,
    InnerHyper,
    ModelIdentity,
    RunDeclaration,
    SecureAggregationConfig,
    check_run_id,
    egress_policy,
)
from echelon.outer import OuterConfig
from echelon.protocol.stats import StatRanges
from echelon.staleness import StalenessConfig
from echelon.window import WindowConfig

__all__ = ["CoordinatorConfig", "InnerHyper", "SecureAggregationConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    run_id: str = "echelon"
    windows: int = 0  # stop after this many completed windows; 0 = until stopped
    token_unit: float = DEFAULT_TOKEN_UNIT  # w_b = tokens / token_unit * s(tau)
    abort_backoff_s: float = 2.0  # pause after an aborted window (or none) before opening again
    join_grace_s: float = 1.0  # a join opens a window this much later, so joins batch
    inner: InnerHyper = field(default_factory=InnerHyper)
    window: WindowConfig = field(default_factory=WindowConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    secagg: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    delay_aware: bool = False  # Echelon-DA: boundaries keep training while a window is in flight
    adaptive_h: bool = False  # the drift-aware sync controller picks H (and mu) per window
    controller: SyncControllerConfig = field(default_factory=SyncControllerConfig)
    payloads: PayloadAllowList = field(default_factory=PayloadAllowList)
    buffered: bool = False  # FedBuff: boundaries start again as soon as they submitted
    # The next window's key rounds ride on this one's messages (three round trips a window);
    # unset: on whenever level 2 is.
    prekey: bool | None = None
    rebase_carry: float = 1.0
    clip_norm: float = 10.0
    stats: StatRanges = field(default_factory=StatRanges)
    round_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.windows < 0:
            raise ValueError(f"CoordinatorConfig.windows: got {self.windows}, want >= 0")
        if not (self.abort_backoff_s > 0 and self.join_grace_s >= 0):
            raise ValueError(
                f"CoordinatorConfig: got abort_backoff_s={self.abort_backoff_s}, join_grace_s="
                f"{self.join_grace_s}; want > 0 and >= 0"
            )
        if not self.token_unit > 0:
            raise ValueError(f"CoordinatorConfig.token_unit: got {self.token_unit}, want > 0")
        check_run_id(self.run_id)
        self.policy()  # m_min and k_min as the declaration will state them

    def policy(self) -> Policy:
        """The allow-list the run declares, known before the model is."""
        return egress_policy(window=self.window, secagg=self.secagg, payloads=self.payloads)

    def declaration(self, model: ModelIdentity) -> RunDeclaration:
        """The run's declaration, once the first registration has pinned the model.

        Raises DeclarationError when the components do not make a valid run.
        """
        return RunDeclaration(
            run_id=self.run_id,
            model=model,
            secagg=self.secagg,
            payloads=self.payloads,
            window=self.window,
            staleness=self.staleness,
            outer=self.outer,
            inner=self.inner,
            adaptive_h=self.adaptive_h,
            controller=self.controller,
            delay_aware=self.delay_aware,
            token_unit=self.token_unit,
            buffered=self.buffered,
            prekey=self.secagg.level2 if self.prekey is None else self.prekey,
            rebase_carry=self.rebase_carry,
            clip_norm=self.clip_norm,
            stats=self.stats,
            round_timeout_s=self.round_timeout_s,
            windows=self.windows,
        )
