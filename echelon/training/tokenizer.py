"""Tokenizers for training: the model directory's own tokenizer, or a byte-level BPE trained
deterministically with `tokenizers` on local text; saved to and loaded from a directory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = structlog.get_logger(__name__)

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_READ_CHUNK_CHARS = 1 << 20


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the few things training needs: ids, eos, vocab, digest."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str = EOS_TOKEN) -> None:
        self._tok = tokenizer
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(
                f"tokenizer: no {eos_token!r} token; want a tokenizer with an eos token"
            )
        self.eos_id: int = int(eos)
        self.eos_token = eos_token

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids)))

    def to_json(self) -> str:
        return str(self._tok.to_str())

    def digest(self) -> str:
        return tokenizer_digest(self)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path


def tokenizer_digest(tokenizer: TextTokenizer) -> str:
    """Hex SHA-256 of the tokenizer's canonical serialization (vocab, merges, normalizers)."""
    return hashlib.sha256(b"echelon.tokenizer.v1\x00" + tokenizer.to_json().encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """How to obtain a tokenizer: from `model_dir` when it has one, else train BPE on `files`."""

    files: tuple[Path, ...] = ()
    vocab_size: int = 4096
    model_dir: Path | None = None
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(
                f"TokenizerConfig.vocab_size: got {self.vocab_size}, want >= 300 "
                "(256 byte symbols plus merges and special tokens)"
            )
        if self.model_dir is None and not self.files:
            raise ValueError("TokenizerConfig: give model_dir or at least one training file")


def _iter_text(files: Sequence[Path]) -> Iterator[str]:
    for path in sorted(Path(f) for f in files):
        with path.open(encoding="utf-8", errors="replace") as handle:
            while chunk := handle.read(_READ_CHUNK_CHARS):
                yield from chunk.splitlines()


def train_bpe(
    files: Sequence[Path], *, vocab_size: int = 4096, min_frequency: int = 2
) -> TextTokenizer:
    """Train a byte-level BPE on `files` (read in sorted path order, so the result depends only
    on the files' contents and `vocab_size`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_text(files), trainer=trainer)
    log.info("tokenizer_trained", vocab_size=tok.get_vocab_size(), files=len(files))
    return TextTokenizer(tok)


def load_tokenizer(directory: Path) -> TextTokenizer:
    """Load `directory/tokenizer.json` (ours, or a model directory's fast tokenizer).

    Raises:
        FileNotFoundError: the directory has no tokenizer.json.
        ValueError: the tokenizer has no recognisable eos token.
    """
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}; train one with train_bpe")
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    for candidate in (EOS_TOKEN, "</s>", "<eos>", "<|eot_id|>", "<|end_of_text|>"):
        if candidate in vocab:
            return TextTokenizer(tok, eos_token=candidate)
    raise ValueError(f"{path}: no known eos token; want one of {EOS_TOKEN!r}, '</s>', '<eos>'")


def obtain_tokenizer(cfg: TokenizerConfig, out_dir: Path) -> TextTokenizer:
    """The model directory's tokenizer when it has one; else load `out_dir`'s, else train one
    on `cfg.files` and save it to `out_dir` (so a second call is a load)."""
    if cfg.model_dir is not None and (Path(cfg.model_dir) / TOKENIZER_FILE).is_file():
        return load_tokenizer(Path(cfg.model_dir))
    if (Path(out_dir) / TOKENIZER_FILE).is_file():
        return load_tokenizer(Path(out_dir))
    tok = train_bpe(cfg.files, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    tok.save(Path(out_dir))
    return tok


def export_hf_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Save the tokenizer in `tokenizer_dir` as a transformers fast tokenizer in `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(tokenizer_dir)
    fast_tokenizer: Any = PreTrainedTokenizerFast  # transformers ships no type information
    hf = fast_tokenizer(
        tokenizer_file=str(Path(tokenizer_dir) / TOKENIZER_FILE),
        eos_token=tok.eos_token,
        pad_token=PAD_TOKEN if tok.has_token(PAD_TOKEN) else tok.eos_token,
    )
    hf.save_pretrained(str(out_dir))
