"""Configuration of one simulated run (boundaries, speeds, WAN, faults, data skew, budget) and
the `World` it runs in: the sampled corpus, its tokenizer, the pre-trained tiny base and the
held-out batches, prepared once per process and shared by every run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from echelon.sim.base import BaseConfig, prepare_base, pretrain_files
from echelon.sim.data import Corpus, CorpusConfig, PartitionConfig, load_corpus, val_batches
from echelon.sim.network import FaultConfig, LinkConfig
from echelon.training.model_config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One run's setting; every time is virtual seconds, every size tokens or bytes."""

    boundaries: int = 4
    devices: int = 3
    speeds: tuple[float, ...] = (1.0, 1.0, 0.85, 0.6)
    device_tokens_s: float = 4000.0
    link: LinkConfig = field(default_factory=LinkConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    batch_size: int = 8
    lora_r: int = 8
    warmup_steps: int = 4
    token_budget: int = 300_000
    k_min: int = 2
    clip_norm: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.boundaries < 2 or self.devices < 1:
            raise ValueError(
                f"SimConfig: got boundaries={self.boundaries}, devices={self.devices}; "
                "want >= 2 boundaries and >= 1 device each"
            )
        if len(self.speeds) != self.boundaries or min(self.speeds) <= 0:
            raise ValueError(
                f"SimConfig.speeds: got {self.speeds}, want {self.boundaries} positive factors"
            )
        if not self.device_tokens_s > 0 or self.batch_size < 1 or self.lora_r < 1:
            raise ValueError("SimConfig: want device_tokens_s > 0, batch_size >= 1, lora_r >= 1")
        if self.token_budget < 1 or self.warmup_steps < 0:
            raise ValueError("SimConfig: want token_budget >= 1 and warmup_steps >= 0")
        if not self.k_min >= 1 or not self.clip_norm > 0:
            raise ValueError(f"SimConfig: got k_min={self.k_min}, clip_norm={self.clip_norm}")


@dataclass(frozen=True)
class World:
    """What every run of a contest shares: data, tokenizer, base model, held-out batches."""

    corpus: Corpus
    model_cfg: ModelConfig
    val: list[torch.Tensor]
    seq_len: int


def prepare_world(corpus_cfg: CorpusConfig, base_cfg: BaseConfig, eval_batch: int = 32) -> World:
    """Loads (or builds and caches) the corpus sample, tokenizer and pre-trained base."""
    pre = pretrain_files(corpus_cfg.work_dir / "pretrain", base_cfg.pretrain_bytes)
    corpus = load_corpus(corpus_cfg, seed=0, tokenizer_files=pre)
    model_cfg = prepare_base(
        base_cfg, corpus.tokenizer, pre, corpus_cfg.work_dir, corpus_cfg.seq_len
    )
    return World(
        corpus=corpus,
        model_cfg=model_cfg,
        val=val_batches(corpus.val, eval_batch),
        seq_len=corpus_cfg.seq_len,
    )
