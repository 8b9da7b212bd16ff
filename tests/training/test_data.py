"""Data: tokenized blocks, held-out split, device shards, partitioners, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echelon.training.data import (
    BatchSampler,
    DataConfig,
    dirichlet_partition,
    fixed_batches,
    iid_partition,
    load_blocks,
    split_train_val,
    tokenize_file,
)
from echelon.training.tokenizer import TextTokenizer


def test_blocks_split_and_cache(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    cfg = DataConfig(files=corpus_files, seq_len=32, max_tokens_per_file=6400)

    blocks = load_blocks(cfg, tokenizer, cache_dir=tmp_path)
    cached = load_blocks(cfg, tokenizer, cache_dir=tmp_path)
    train, val = split_train_val(blocks, 0.1, seed=0)
    train2, val2 = split_train_val(blocks, 0.1, seed=0)

    assert blocks.tokens.shape == (400, 32)
    assert np.array_equal(cached.tokens, blocks.tokens)
    assert len(list(tmp_path.glob("blocks-*.npz"))) == 1
    assert len(train) + len(val) == len(blocks)
    assert np.array_equal(val.tokens, val2.tokens) and np.array_equal(train.tokens, train2.tokens)
    assert set(np.unique(val.sources)) == {0, 1}  # stratified by source
    assert len(val) == 40  # 10% of each source's 200 blocks


def test_jsonl_documents_end_with_eos(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha beta", "gamma"]) + "\n")

    stream = tokenize_file(path, tokenizer)

    assert stream.dtype == np.int32
    assert int((stream == tokenizer.eos_id).sum()) == 2
    assert stream[-1] == tokenizer.eos_id


def test_iid_partition_covers_disjointly() -> None:
    parts = iid_partition(103, 4, seed=3)

    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 4, seed=3), strict=True)
    )


def _domain_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=labels.max() + 1).astype(float)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_partition_properties() -> None:
    labels = np.repeat(np.arange(4), 250)

    skewed = dirichlet_partition(labels, 4, alpha=0.1, seed=7)
    even = dirichlet_partition(labels, 4, alpha=100.0, seed=7)

    for parts in (skewed, even):
        assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
        assert min(len(p) for p in parts) >= 1
    assert all(
        np.array_equal(a, b)
        for a, b in zip(skewed, dirichlet_partition(labels, 4, 0.1, 7), strict=True)
    )
    assert _domain_entropy(skewed, labels) < 0.8 < _domain_entropy(even, labels)
    with pytest.raises(ValueError, match="want > 0"):
        dirichlet_partition(labels, 4, alpha=0.0, seed=0)


def test_batch_sampler_shapes_epochs_and_seed(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer
) -> None:
    blocks = load_blocks(
        DataConfig(files=corpus_files, seq_len=16, max_tokens_per_file=800), tokenizer
    )
    sampler = BatchSampler(blocks, batch_size=7, seed=1)
    same = BatchSampler(blocks, batch_size=7, seed=1)

    batches = [sampler.next_batch() for _ in range(20)]

    assert all(b.shape == (7, 16) and b.dtype.is_floating_point is False for b in batches)
    assert all(bool((b == same.next_batch()).all()) for b in batches)
    assert sampler.epoch == 2  # 100 blocks, 140 drawn
    val = fixed_batches(blocks, 32, max_batches=3)
    assert [len(b) for b in val] == [32, 32, 32]


def test_data_config_messages() -> None:
    with pytest.raises(ValueError, match=r"want a \.txt or \.jsonl"):
        DataConfig(files=(Path("a.csv"),))
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(files=(Path("a.txt"),), val_fraction=1.0)
