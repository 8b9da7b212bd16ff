"""Training data: local `.txt` / `.jsonl` files tokenized into fixed-length blocks, a
deterministic held-out split, IID and Dirichlet-over-domains partitions across boundaries and
devices, and seeded batch sampling for one device's shard."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from echelon.training.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)

_CHUNK_CHARS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which files to read and how to cut them; `max_tokens_per_file` caps each file's stream."""

    files: tuple[Path, ...]
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    max_tokens_per_file: int | None = None

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("DataConfig.files: want at least one .txt or .jsonl file")
        for f in self.files:
            if Path(f).suffix not in {".txt", ".jsonl"}:
                raise ValueError(f"DataConfig.files: got {f}, want a .txt or .jsonl file")
        if self.seq_len < 2:
            raise ValueError(f"DataConfig.seq_len: got {self.seq_len}, want >= 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction: got {self.val_fraction}, want in (0, 1)")
        if self.max_tokens_per_file is not None and self.max_tokens_per_file < self.seq_len:
            raise ValueError(
                f"DataConfig.max_tokens_per_file: got {self.max_tokens_per_file}, "
                f"want None or >= seq_len={self.seq_len}"
            )


@dataclass(frozen=True)
class TokenBlocks:
    """Token blocks of shape (n, seq_len) and the index of the file each block came from."""

    tokens: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.sources.shape != (self.tokens.shape[0],):
            raise ValueError(
                f"TokenBlocks: got tokens {self.tokens.shape}, sources {self.sources.shape}; "
                "want (n, seq_len) and (n,)"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, indices: np.ndarray) -> TokenBlocks:
        return TokenBlocks(self.tokens[indices], self.sources[indices])


def _documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: want a JSON object with a string 'text'")
                yield text
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _chunks(text: str) -> list[str]:
    # Cut long texts at line ends so that encode_batch can run in parallel. The byte-level
    # pre-tokenizer splits at newlines already, so a cut can change at most the whitespace
    # token right after it; the result stays deterministic.
    out: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        out.append(text[start:end])
        start = end
    return out


def tokenize_file(
    path: Path, tokenizer: TextTokenizer, max_tokens: int | None = None
) -> np.ndarray:
    """One file as an int32 token stream: documents in order, each followed by eos."""
    ids: list[int] = []
    for doc in _documents(Path(path)):
        for piece in tokenizer.encode_batch(_chunks(doc)):
            ids.extend(piece)
        ids.append(tokenizer.eos_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    stream = np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int32)
    return stream


def make_blocks(streams: Sequence[np.ndarray], seq_len: int) -> TokenBlocks:
    """Cut each stream into whole blocks of `seq_len` tokens (a short tail is dropped)."""
    tokens: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    for index, stream in enumerate(streams):
        n = len(stream) // seq_len
        tokens.append(stream[: n * seq_len].reshape(n, seq_len))
        sources.append(np.full(n, index, dtype=np.int64))
    return TokenBlocks(
        np.concatenate(tokens).astype(np.int32) if tokens else np.zeros((0, seq_len), np.int32),
        np.concatenate(sources) if sources else np.zeros(0, np.int64),
    )


def load_blocks(
    cfg: DataConfig, tokenizer: TextTokenizer, cache_dir: Path | None = None
) -> TokenBlocks:
    """Tokenize `cfg.files` into blocks; cached in `cache_dir` keyed by files and tokenizer.

    Raises:
        ValueError: the files hold fewer than two blocks of `cfg.seq_len` tokens.
    """
    key = hashlib.sha256(tokenizer.digest().encode())
    for f in cfg.files:
        st = Path(f).stat()
        key.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\x00".encode())
    key.update(f"{cfg.seq_len}|{cfg.max_tokens_per_file}".encode())
    cached = Path(cache_dir) / f"blocks-{key.hexdigest()[:20]}.npz" if cache_dir else None
    if cached is not None and cached.is_file():
        with np.load(cached) as npz:
            return TokenBlocks(npz["tokens"], npz["sources"])
    streams = [tokenize_file(Path(f), tokenizer, cfg.max_tokens_per_file) for f in cfg.files]
    blocks = make_blocks(streams, cfg.seq_len)
    if len(blocks) < 2:
        raise ValueError(
            f"data: {len(blocks)} block(s) of seq_len={cfg.seq_len}; want more text or a "
            "smaller seq_len"
        )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".{np.random.default_rng().integers(1 << 62)}.tmp")
        with tmp.open("wb") as handle:
            np.savez(handle, tokens=blocks.tokens, sources=blocks.sources)
        tmp.replace(cached)
    log.info("data_tokenized", blocks=len(blocks), files=len(cfg.files), seq_len=cfg.seq_len)
    return blocks


def split_train_val(
    blocks: TokenBlocks, val_fraction: float, seed: int
) -> tuple[TokenBlocks, TokenBlocks]:
    """Deterministic held-out split, stratified by source file (at least one block of each
    source with two or more blocks goes to validation)."""
    rng = np.random.default_rng([seed, 0x5EED])
    val_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for source in np.unique(blocks.sources):
        idx = np.flatnonzero(blocks.sources == source)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) >= 2 else 0
        val_idx.append(np.sort(idx[:n_val]))
        train_idx.append(np.sort(idx[n_val:]))
    train = np.concatenate(train_idx)
    val = np.concatenate(val_idx)
    return blocks.select(train), blocks.select(val)


def iid_partition(n_items: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """Seeded random split of `range(n_items)` into `n_parts` parts of (near) equal size."""
    if n_parts <= 0 or n_items < n_parts:
        raise ValueError(
            f"iid_partition: got n_items={n_items}, n_parts={n_parts}; want 1 <= n_parts <= n_items"
        )
    perm = np.random.default_rng([seed, 0x11D]).permutation(n_items)
    return [np.sort(part) for part in np.array_split(perm, n_parts)]


def dirichlet_partition(
    labels: np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Non-IID split: the items of each label (domain) are divided across parts in proportions
    drawn from Dirichlet(alpha); small alpha gives each part few domains. Seeded; redrawn until
    every part has at least `min_size` items.

    Raises:
        ValueError: bad arguments, or no draw within `max_tries` gave every part `min_size` items.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet_partition.alpha: got {alpha}, want > 0")
    if n_parts <= 0 or len(labels) < n_parts * min_size:
        raise ValueError(
            f"dirichlet_partition: got {len(labels)} items for {n_parts} parts of >= {min_size}"
        )
    rng = np.random.default_rng([seed, 0xD1A])
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for cls in classes:
            idx = np.flatnonzero(labels == cls)
            idx = idx[rng.permutation(len(idx))]
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for part, piece in zip(parts, np.split(idx, cuts), strict=True):
                part.append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet_partition: no draw in {max_tries} tries gave every part {min_size} items; "
        "raise alpha or lower n_parts"
    )


class BatchSampler:
    """Endless seeded batches of (batch_size, seq_len) int64 token ids from one shard: each
    epoch is a fresh permutation of the shard's blocks."""

    def __init__(self, blocks: TokenBlocks, batch_size: int, seed: int) -> None:
        if len(blocks) == 0:
            raise ValueError("BatchSampler: the shard holds no blocks; want more data per device")
        if batch_size <= 0:
            raise ValueError(f"BatchSampler.batch_size: got {batch_size}, want > 0")
        self._blocks = blocks
        self.batch_size = batch_size
        self._rng = np.random.default_rng([seed, 0xBA7])
        self._order = np.zeros(0, dtype=np.int64)
        self._pos = 0
        self.epoch = 0

    def next_batch(self) -> torch.Tensor:
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:
            if self._pos >= len(self._order):
                self._order = self._rng.permutation(len(self._blocks))
                self._pos = 0
                self.epoch += 1
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            picked.append(take)
        rows = self._blocks.tokens[np.concatenate(picked)]
        return torch.from_numpy(rows.astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()


def fixed_batches(
    blocks: TokenBlocks, batch_size: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """Validation batches in block order (the last one may be smaller)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(blocks), batch_size):
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(torch.from_numpy(blocks.tokens[start : start + batch_size].astype(np.int64)))
    return out
