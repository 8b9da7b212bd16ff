"""A tiny simulator world shared by the simulator tests: two registry-free text domains, a
320-token BPE, a one-layer random base."""

from __future__ import annotations

from pathlib import Path

import pytest

from echelon.sim.base import BaseConfig
from echelon.sim.config import SimConfig, World, prepare_world
from echelon.sim.data import CorpusConfig, PartitionConfig, Skew


def tiny_corpus(root: Path) -> CorpusConfig:
    return CorpusConfig(
        cache_dir=root / "corpus",
        work_dir=root / "sim",
        domains=("stdlib-a", "stdlib-b"),
        bytes_per_domain=30_000,
        vocab_size=320,
        seq_len=32,
        val_blocks_per_domain=4,
    )


TINY_BASE = BaseConfig(layers=1, hidden=32, heads=2, intermediate=64, pretrain_steps=0)


@pytest.fixture(scope="session")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny world's corpus, tokenizer and blocks are cached for the session."""
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="session")
def world(world_root: Path) -> World:
    return prepare_world(tiny_corpus(world_root), TINY_BASE)


@pytest.fixture
def sim() -> SimConfig:
    return SimConfig(
        boundaries=2,
        devices=2,
        speeds=(1.0, 0.7),
        device_tokens_s=2000.0,
        batch_size=2,
        lora_r=2,
        token_budget=1536,
        partition=PartitionConfig(skew=Skew.IID),
    )
