"""Shared fixtures for the training tests: a small registry-free corpus and a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from echelon.training.corpus import cached_domain
from echelon.training.tokenizer import TextTokenizer, train_bpe

CORPUS_BYTES = 120_000
VOCAB = 512


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("corpus")
    a = cached_domain("stdlib-a", cache, max_bytes=CORPUS_BYTES)
    b = cached_domain("stdlib-b", cache, max_bytes=CORPUS_BYTES)
    return a.path, b.path


@pytest.fixture(scope="session")
def tokenizer(corpus_files: tuple[Path, Path]) -> TextTokenizer:
    return train_bpe(corpus_files, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer: TextTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(directory)
    return directory
