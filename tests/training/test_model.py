"""Tiny base + LoRA: deterministic builds, LoRA-only training, frozen-A mode, peft export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from echelon.training.adapter import flatten
from echelon.training.model import (
    LoraConfig,
    ModelConfig,
    base_digest,
    build_base,
    build_model,
    load_lora_state,
    load_peft_for_generation,
    lora_state,
    save_peft_adapter,
)
from echelon.training.tokenizer import TextTokenizer, TokenizerConfig, obtain_tokenizer

VOCAB = 512
SMALL = ModelConfig(layers=1, hidden=64, heads=2, intermediate=128, max_seq=64)


def test_tiny_model_is_identical_across_builds() -> None:
    torch.manual_seed(1234)
    first, layout_a = build_model(SMALL, LoraConfig(), VOCAB)
    torch.manual_seed(99)
    second, layout_b = build_model(SMALL, LoraConfig(), VOCAB)

    assert base_digest(first) == base_digest(second)
    assert layout_a.digest() == layout_b.digest()
    assert np.array_equal(
        flatten(lora_state(first, layout_a), layout_a),
        flatten(lora_state(second, layout_b), layout_b),
    )
    assert base_digest(build_base(SMALL, VOCAB)) == base_digest(first)  # LoRA not hashed
    other, _ = build_model(dataclasses.replace(SMALL, seed=1), LoraConfig(), VOCAB)
    assert base_digest(other) != base_digest(first)


def test_only_lora_parameters_get_gradients() -> None:
    model, layout = build_model(SMALL, LoraConfig(), VOCAB)
    batch = torch.randint(0, VOCAB, (2, 16))

    model(input_ids=batch, labels=batch).loss.backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(layout.names)
    assert all("lora_" in n for n in with_grad)
    assert len(layout.names) == 2 * 7  # A and B for 7 projections in 1 layer


def test_frozen_a_travels_only_b() -> None:
    model, layout = build_model(SMALL, LoraConfig(frozen_a=True), VOCAB)
    again, _ = build_model(SMALL, LoraConfig(frozen_a=True), VOCAB)

    assert layout.names and all("lora_B" in n for n in layout.names)
    a_params = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert a_params and not any(p.requires_grad for p in a_params.values())
    again_a = dict(again.named_parameters())
    assert all(torch.equal(p, again_a[n]) for n, p in a_params.items())


def test_lora_state_round_trip() -> None:
    model, layout = build_model(SMALL, LoraConfig(), VOCAB)
    state = {n: torch.full_like(t, 0.5) for n, t in lora_state(model, layout).items()}

    load_lora_state(model, state)

    assert all(torch.equal(t, state[n]) for n, t in lora_state(model, layout).items())


def test_save_peft_adapter_loads_with_peft_and_generates(
    tmp_path: Path, tokenizer: TextTokenizer, tokenizer_dir: Path
) -> None:
    model_cfg = ModelConfig(layers=1, hidden=64, heads=2, intermediate=128, max_seq=64)
    _, layout = build_model(model_cfg, LoraConfig(), tokenizer.vocab_size)
    vec = np.random.default_rng(0).normal(0, 0.02, layout.numel).astype(np.float32)

    saved = save_peft_adapter(
        model_cfg, LoraConfig(), tokenizer.vocab_size, vec, tmp_path, tokenizer_dir=tokenizer_dir
    )
    assert saved.base_dir is not None
    loaded = load_peft_for_generation(saved.base_dir, saved.adapter_dir)
    prompt = torch.tensor([tokenizer.encode("Return the value of")])
    out = loaded.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)

    assert out.shape == (1, prompt.shape[1] + 5)
    assert np.allclose(flatten(lora_state(loaded, layout), layout), vec)
    assert (saved.base_dir / "tokenizer.json").is_file()


def test_local_directory_source_matches_the_tiny_base(
    tmp_path: Path, tokenizer: TextTokenizer, tokenizer_dir: Path
) -> None:
    _, layout = build_model(SMALL, LoraConfig(), tokenizer.vocab_size)
    saved = save_peft_adapter(
        SMALL,
        LoraConfig(),
        tokenizer.vocab_size,
        np.zeros(layout.numel, dtype=np.float32),
        tmp_path,
        tokenizer_dir=tokenizer_dir,
    )
    assert saved.base_dir is not None

    from_dir, dir_layout = build_model(
        ModelConfig(source=str(saved.base_dir)), LoraConfig(), tokenizer.vocab_size
    )
    dir_tokenizer = obtain_tokenizer(TokenizerConfig(model_dir=saved.base_dir), tmp_path / "t")

    assert base_digest(from_dir) == base_digest(build_base(SMALL, tokenizer.vocab_size))
    assert dir_layout.digest() == layout.digest()
    sample = "Return the HTTP header, or None."
    assert dir_tokenizer.encode(sample) == tokenizer.encode(sample)
    assert dir_tokenizer.eos_id == tokenizer.eos_id
