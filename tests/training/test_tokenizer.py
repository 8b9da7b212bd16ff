"""Tokenizer: deterministic BPE training, save/load, model-directory tokenizer first."""

from __future__ import annotations

from pathlib import Path

import pytest

from echelon.training.tokenizer import (
    EOS_TOKEN,
    TextTokenizer,
    TokenizerConfig,
    load_tokenizer,
    obtain_tokenizer,
    tokenizer_digest,
    train_bpe,
)


def test_training_is_deterministic(
    corpus_files: tuple[Path, Path], tokenizer: TextTokenizer
) -> None:
    again = train_bpe(tuple(reversed(corpus_files)), vocab_size=tokenizer.vocab_size)

    assert tokenizer_digest(again) == tokenizer_digest(tokenizer)
    assert tokenizer.vocab_size == 512


def test_save_load_round_trip(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Return the HTTP header, or None.\n  Indented line."

    assert loaded.digest() == tokenizer.digest()
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_id == tokenizer.eos_id
    assert loaded.encode(EOS_TOKEN) == [loaded.eos_id]


def test_obtain_prefers_model_directory(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tokenizer.save(model_dir)
    out_dir = tmp_path / "out"
    cfg = TokenizerConfig(model_dir=model_dir, vocab_size=300)

    got = obtain_tokenizer(cfg, out_dir)

    assert got.digest() == tokenizer.digest()
    assert not out_dir.exists()


def test_obtain_trains_then_loads(corpus_files: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = TokenizerConfig(files=(corpus_files[0],), vocab_size=300)

    first = obtain_tokenizer(cfg, tmp_path)
    second = obtain_tokenizer(cfg, tmp_path)

    assert (tmp_path / "tokenizer.json").is_file()
    assert first.digest() == second.digest()


def test_config_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="want >= 300"):
        TokenizerConfig(files=(Path("x.txt"),), vocab_size=100)
    with pytest.raises(ValueError, match="model_dir or at least one"):
        TokenizerConfig()
