"""The simulator's data: demo-corpus domains cut to a sample, a BPE tokenizer trained on them,
a held-out set balanced over domains, and the IID / Dirichlet / one-domain-per-organization
partition of the training blocks over boundaries and, within each boundary, over devices."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from echelon.training.corpus import cached_domain
from echelon.training.data import (
    DataConfig,
    TokenBlocks,
    dirichlet_partition,
    iid_partition,
    load_blocks,
    split_train_val,
)
from echelon.training.tokenizer import TextTokenizer, TokenizerConfig, obtain_tokenizer


class Skew(Enum):
    """How the training data is spread over boundaries."""

    IID = "iid"  # every boundary draws from every domain alike
    DIRICHLET = "dirichlet"  # domain shares per boundary from Dirichlet(alpha)
    DOMAIN = "domain"  # one domain per organization


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Which demo-corpus domains, how much of each, and the tokenizer and block shape."""

    cache_dir: Path = Path(".cache/corpus")
    work_dir: Path = Path(".cache/sim")
    domains: tuple[str, ...] = ("scripture", "python-docs", "quotations", "dictionary")
    bytes_per_domain: int = 300_000
    vocab_size: int = 1024
    seq_len: int = 64
    val_blocks_per_domain: int = 16

    def __post_init__(self) -> None:
        # TOML gives strings; keep the fields paths.
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "work_dir", Path(self.work_dir))
        if len(self.domains) < 1 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"CorpusConfig.domains: got {self.domains}, want distinct names")
        if self.bytes_per_domain < 10_000:
            raise ValueError(
                f"CorpusConfig.bytes_per_domain: got {self.bytes_per_domain}, want >= 10000"
            )
        if self.seq_len < 8 or self.val_blocks_per_domain < 1:
            raise ValueError("CorpusConfig: want seq_len >= 8 and val_blocks_per_domain >= 1")


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """The skew over boundaries; devices of one boundary always split its data IID."""

    skew: Skew = Skew.DIRICHLET
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"PartitionConfig.alpha: got {self.alpha}, want > 0")


@dataclass(frozen=True)
class Corpus:
    """Training blocks (with their domain index), the balanced held-out set, the vocabulary."""

    train: TokenBlocks
    val: TokenBlocks
    tokenizer: TextTokenizer
    domains: tuple[str, ...]


def _sample_text(src: Path, dst: Path, max_bytes: int) -> None:
    if dst.is_file():
        return
    raw = src.read_bytes()[:max_bytes]
    cut = raw.rfind(b"\n")
    text = raw[: cut + 1 if cut > 0 else len(raw)].decode("utf-8", errors="ignore")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(dst)


def load_corpus(cfg: CorpusConfig, seed: int = 0, tokenizer_files: tuple[Path, ...] = ()) -> Corpus:
    """Samples, tokenizes (cached under `cfg.work_dir`) and splits the corpus; the tokenizer
    is trained on the samples and `tokenizer_files` (the base model's pre-training text).

    Raises:
        ValueError: a domain is unknown or too short for the held-out set.
    """
    key = hashlib.sha256(
        f"{cfg.domains}|{cfg.bytes_per_domain}|{cfg.vocab_size}|{tokenizer_files}".encode()
    ).hexdigest()[:16]
    work = Path(cfg.work_dir) / f"corpus-{key}"
    files: list[Path] = []
    for name in cfg.domains:
        text = cached_domain(name, Path(cfg.cache_dir))
        sample = work / "text" / f"{name}.txt"
        _sample_text(text.path, sample, cfg.bytes_per_domain)
        files.append(sample)
    tokenizer = obtain_tokenizer(
        TokenizerConfig(files=(*files, *tokenizer_files), vocab_size=cfg.vocab_size),
        work / "tokenizer",
    )
    blocks = load_blocks(
        DataConfig(files=tuple(files), seq_len=cfg.seq_len, seed=seed),
        tokenizer,
        cache_dir=work / "blocks",
    )
    train, rest = split_train_val(blocks, 0.05, seed)
    picked: list[np.ndarray] = []
    for source in range(len(cfg.domains)):
        idx = np.flatnonzero(rest.sources == source)
        if len(idx) < cfg.val_blocks_per_domain:
            raise ValueError(
                f"domain {cfg.domains[source]}: {len(idx)} held-out blocks, want "
                f">= {cfg.val_blocks_per_domain}; raise bytes_per_domain"
            )
        picked.append(idx[: cfg.val_blocks_per_domain])
    val = rest.select(np.concatenate(picked))
    return Corpus(train=train, val=val, tokenizer=tokenizer, domains=cfg.domains)


def partition(
    train: TokenBlocks, n_boundaries: int, devices: int, cfg: PartitionConfig, seed: int
) -> list[list[TokenBlocks]]:
    """Blocks of each device of each boundary: `out[b][k]`.

    Raises:
        ValueError: too few blocks, or one-domain-per-organization with more boundaries than
            domains.
    """
    if cfg.skew is Skew.IID:
        parts = iid_partition(len(train), n_boundaries, seed)
    elif cfg.skew is Skew.DIRICHLET:
        parts = dirichlet_partition(
            train.sources, n_boundaries, cfg.alpha, seed, min_size=devices * 4
        )
    else:
        domains = np.unique(train.sources)
        if n_boundaries > len(domains):
            raise ValueError(
                f"skew 'domain': {n_boundaries} boundaries but {len(domains)} domains; want "
                "at most one boundary per domain"
            )
        parts = [np.flatnonzero(train.sources == d) for d in domains[:n_boundaries]]
    out: list[list[TokenBlocks]] = []
    for b, part in enumerate(parts):
        shard = train.select(part)
        split = iid_partition(len(shard), devices, seed * 7919 + b)
        out.append([shard.select(s) for s in split])
    return out


def val_batches(val: TokenBlocks, batch_size: int) -> list[torch.Tensor]:
    """The held-out blocks as int64 batches (the same for every run with the same corpus)."""
    return [
        torch.from_numpy(val.tokens[i : i + batch_size].astype(np.int64))
        for i in range(0, len(val), batch_size)
    ]
