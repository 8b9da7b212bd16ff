"""The base model the simulator adapts: the tiny Llama, briefly pre-trained on the registry-free
standard-library text so that LoRA adaptation to the demo-corpus domains has signal; cached
as a local Hugging Face directory keyed by its configuration."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from echelon.training.corpus import STDLIB_GROUPS, cached_domain
from echelon.training.data import BatchSampler, DataConfig, load_blocks
from echelon.training.model import build_base
from echelon.training.model_config import ModelConfig
from echelon.training.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Shape of the tiny base and its pre-training (0 steps: the seeded random base)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    intermediate: int = 172
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 16
    pretrain_bytes: int = 250_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pretrain_steps < 0 or not self.pretrain_lr > 0 or self.pretrain_batch < 1:
            raise ValueError(
                f"BaseConfig: got pretrain_steps={self.pretrain_steps}, lr={self.pretrain_lr}, "
                f"batch={self.pretrain_batch}; want >= 0, > 0, >= 1"
            )


def pretrain_files(cache_dir: Path, max_bytes: int) -> tuple[Path, ...]:
    """The standard-library text domains (built locally, no registry)."""
    return tuple(cached_domain(name, cache_dir, max_bytes=max_bytes).path for name in STDLIB_GROUPS)


def prepare_base(
    cfg: BaseConfig, tokenizer: TextTokenizer, files: tuple[Path, ...], work_dir: Path, seq_len: int
) -> ModelConfig:
    """The `ModelConfig` of the base: `tiny` itself without pre-training, else a cached local
    directory holding the pre-trained tiny base (trained on first use, deterministic)."""
    tiny = ModelConfig(
        layers=cfg.layers,
        hidden=cfg.hidden,
        heads=cfg.heads,
        intermediate=cfg.intermediate,
        max_seq=max(64, seq_len),
        seed=cfg.seed,
    )
    if cfg.pretrain_steps == 0:
        return tiny
    key = hashlib.sha256(f"{cfg}|{tokenizer.digest()}|{seq_len}".encode()).hexdigest()[:16]
    out = Path(work_dir) / f"base-{key}"
    if not (out / "config.json").is_file():
        base = build_base(tiny, tokenizer.vocab_size)
        blocks = load_blocks(DataConfig(files=files, seq_len=seq_len), tokenizer)
        sampler = BatchSampler(blocks, cfg.pretrain_batch, seed=cfg.seed)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(base.parameters(), lr=cfg.pretrain_lr)
        base.train()
        for _ in range(cfg.pretrain_steps):
            batch = sampler.next_batch()
            loss = base(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.random.set_rng_state(gen_state)
        tmp = out.with_name(out.name + ".tmp")
        base.save_pretrained(str(tmp))
        tmp.replace(out)
        log.info("base_pretrained", steps=cfg.pretrain_steps, dir=str(out))
    return ModelConfig(source=str(out), max_seq=max(64, seq_len))
