"""One simulated boundary: its devices' inner loops on their shards, the level-1 average of
their deltas (what the agent would unmask), the export policy, and the delay-aware re-base.

All devices of all boundaries share one model object and run one after another; each device
keeps its own AdamW state (its `InnerLoop`) and its own current adapter as a flat vector.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from echelon.controller import relative_drift
from echelon.policy import ExportPolicy, ExportRefused, apply_export_policy
from echelon.sim.network import FaultConfig, LinkConfig, device_present
from echelon.training.adapter import AdapterLayout
from echelon.training.data import BatchSampler, TokenBlocks
from echelon.training.inner import InnerConfig, InnerLoop


@dataclass
class Device:
    """A device's persistent state: optimizer, batches, current adapter, snapshot at submit."""

    loop: InnerLoop
    sampler: BatchSampler
    theta: np.ndarray
    at_submit: np.ndarray | None = None
    present: bool = True


@dataclass(frozen=True)
class Contribution:
    """A boundary's exported delta (already clipped) with its O(1) metadata."""

    delta: np.ndarray
    tokens: int
    loss: float
    drift: float
    base_version: int
    devices: int


class SimBoundary:
    """Devices of one boundary and the version their current progress starts from."""

    def __init__(
        self,
        *,
        index: int,
        model: torch.nn.Module,
        layout: AdapterLayout,
        shards: list[TokenBlocks],
        inner: InnerConfig,
        speed_tokens_s: float,
        link: LinkConfig,
        seed: int,
        theta0: np.ndarray,
    ) -> None:
        self.index = index
        self.speed_tokens_s = speed_tokens_s
        self.link = link
        self.seed = seed
        self.devices = [
            Device(
                loop=InnerLoop(model, layout, inner),
                sampler=BatchSampler(
                    shard, inner.batch_size, seed=seed * 1_000_003 + 97 * index + k
                ),
                theta=theta0.copy(),
            )
            for k, shard in enumerate(shards)
        ]
        self.base_version = 0
        self.base_theta = theta0.copy()
        self.cycle = 0
        self.steps_in_cycle = 0
        self.loss_sum = 0.0
        self.loss_steps = 0
        self.tokens_in_cycle = 0

    def step_s(self, batch_tokens: int) -> float:
        """Virtual seconds of one inner step (devices of a boundary run in parallel)."""
        return batch_tokens / self.speed_tokens_s

    def start_cycle(self, theta_v: np.ndarray, version: int, faults: FaultConfig) -> None:
        """Begin a training cycle from global version `version` (devices re-drawn for churn)."""
        self.cycle += 1
        self.base_version = version
        self.base_theta = theta_v.copy()
        for k, dev in enumerate(self.devices):
            dev.present = device_present(self.seed, self.index, k, self.cycle, faults.churn)
            dev.theta = theta_v.copy()
            dev.at_submit = None
        self.steps_in_cycle = 0
        self.loss_sum = 0.0
        self.loss_steps = 0
        self.tokens_in_cycle = 0

    def set_mu(self, mu: float) -> None:
        for dev in self.devices:
            if dev.loop.cfg.mu != mu:
                dev.loop.set_config(replace(dev.loop.cfg, mu=mu))

    def train(self, steps: int) -> int:
        """Runs `steps` inner steps on every present device; returns the tokens consumed."""
        if steps <= 0:
            return 0
        tokens = 0
        for dev in self.devices:
            if not dev.present:
                continue
            seq = dev.loop.cfg.seq_len
            batches = (b[:, :seq] for b in dev.sampler)
            result = dev.loop.run(dev.theta, batches, steps)
            dev.theta = dev.loop.adapter().copy()
            tokens += result.tokens
            self.loss_sum += result.mean_loss * steps
            self.loss_steps += steps
        self.steps_in_cycle += steps
        self.tokens_in_cycle += tokens
        return tokens

    def contribution(self, policy: ExportPolicy) -> Contribution | None:
        """The level-1 average delta `theta_v - theta` over present devices, through the export
        policy; None when the policy refuses (too few devices, NaN)."""
        present = [dev for dev in self.devices if dev.present]
        if not present or self.tokens_in_cycle == 0:
            return None
        mean = np.mean([dev.theta for dev in present], axis=0, dtype=np.float64)
        delta = (self.base_theta.astype(np.float64) - mean).astype(np.float32)
        try:
            decision = apply_export_policy(
                delta, devices=len(present), dim=delta.shape[0], policy=policy
            )
        except ExportRefused:
            return None
        for dev in present:
            dev.at_submit = dev.theta.copy()
        return Contribution(
            delta=decision.delta,
            tokens=self.tokens_in_cycle,
            loss=self.loss_sum / max(1, self.loss_steps),
            drift=relative_drift(decision.delta, self.base_theta),
            base_version=self.base_version,
            devices=len(present),
        )

    def rebase(
        self, theta_new: np.ndarray, version: int, faults: FaultConfig, carry: float = 1.0
    ) -> None:
        """Delay-aware re-base: `theta <- theta_(v+1) + carry * (theta_local - theta_submitted)`
        per device; progress made since submission carries over into the new cycle (`carry`
        1 is the plain re-base, less damps progress made on the superseded version)."""
        carried = {
            k: dev.theta - dev.at_submit
            for k, dev in enumerate(self.devices)
            if dev.present and dev.at_submit is not None
        }
        steps, tokens = self.steps_in_cycle, self.tokens_in_cycle
        loss_sum, loss_steps = self.loss_sum, self.loss_steps
        self.start_cycle(theta_new, version, faults)
        for k, dev in enumerate(self.devices):
            if k in carried and dev.present:
                dev.theta = (theta_new + np.float32(carry) * carried[k]).astype(np.float32)
        self.steps_in_cycle, self.tokens_in_cycle = steps, tokens
        self.loss_sum, self.loss_steps = loss_sum, loss_steps

    def begin_flight(self) -> None:
        """After submitting (delay-aware): the next cycle's steps start counting from zero."""
        self.steps_in_cycle = 0
        self.tokens_in_cycle = 0
        self.loss_sum = 0.0
        self.loss_steps = 0
