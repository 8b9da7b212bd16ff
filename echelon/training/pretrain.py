"""Pretrains the built-in tiny Llama on public text, so the demo adapts a language model
rather than random weights.

The result is an ordinary Hugging Face model directory (weights, config, and the BPE
tokenizer as a fast tokenizer), which every organization then loads as its base with
`ModelConfig(source=dir)`; the same directory is what a real deployment would download.
Deterministic on CPU for a given seed and text, and cached: a second call only loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from echelon.training.data import BatchSampler, DataConfig, load_blocks
from echelon.training.inner import InnerConfig, lr_at
from echelon.training.model import build_base
from echelon.training.model_config import ModelConfig
from echelon.training.tokenizer import TokenizerConfig, export_hf_tokenizer, obtain_tokenizer

log = structlog.get_logger(__name__)
_DONE = "echelon-pretrain.json"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How long and how hard to pretrain the tiny base model."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("PretrainConfig: want steps >= 1, batch_size >= 1, seq_len >= 2")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr: got {self.lr}, want > 0")


def pretrain_base(
    files: tuple[Path, ...],
    out_dir: Path,
    model: ModelConfig,
    tokenizer: TokenizerConfig,
    config: PretrainConfig,
) -> Path:
    """Writes a pretrained base model directory at `out_dir` (or reuses a finished one)."""
    marker = out_dir / _DONE
    if marker.is_file():
        return out_dir
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    tok_dir = out_dir / "bpe"
    tok = obtain_tokenizer(tokenizer, tok_dir)
    blocks = load_blocks(DataConfig(files=files, seq_len=config.seq_len), tok)
    sampler = BatchSampler(blocks, config.batch_size, config.seed)
    net = build_base(model, tok.vocab_size)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = InnerConfig(
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps + 1,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
    )
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        batch = sampler.next_batch()
        loss = net(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.steps - 1:
            log.info("pretrain_step", step=step, loss=round(loss.item(), 4))
    net.save_pretrained(str(out_dir))
    export_hf_tokenizer(tok_dir, out_dir)
    marker.write_text(json.dumps({"files": [str(f) for f in files], **asdict(config)}))
    return out_dir
