"""Inner loop: schedule, learning, proximal pull towards theta_v, evaluation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from echelon.training.adapter import flatten
from echelon.training.inner import InnerConfig, InnerLoop, evaluate, lr_at
from echelon.training.model import LoraConfig, ModelConfig, build_model, lora_state

VOCAB = 256
SMALL = ModelConfig(layers=1, hidden=64, heads=2, intermediate=128, max_seq=64)


def _batches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # A learnable pattern: each row counts upwards from a random start.
    starts = torch.randint(0, VOCAB, (4, 1), generator=gen)
    rows = (starts + torch.arange(32)) % VOCAB
    return [rows.clone() for _ in range(64)]


def _delta_norm(mu: float) -> float:
    torch.manual_seed(0)
    model, layout = build_model(SMALL, LoraConfig(), VOCAB)
    theta_v = flatten(lora_state(model, layout), layout)
    cfg = InnerConfig(lr=5e-2, mu=mu, warmup_steps=0, total_steps=100, batch_size=4, seq_len=32)
    loop = InnerLoop(model, layout, cfg)
    loop.run(theta_v, iter(_batches(0)), steps=15)
    return float(np.linalg.norm(loop.adapter() - theta_v))


def test_schedule_warms_up_then_decays() -> None:
    cfg = InnerConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)

    lrs = [lr_at(s, cfg) for s in range(20)]

    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[14] == pytest.approx(0.1) and lrs[19] == pytest.approx(0.1)


def test_inner_steps_lower_the_loss_and_count_tokens() -> None:
    model, layout = build_model(SMALL, LoraConfig(), VOCAB)
    theta_v = flatten(lora_state(model, layout), layout)
    val = _batches(0)[:2]
    before = evaluate(model, val)
    loop = InnerLoop(model, layout, InnerConfig(lr=3e-2, warmup_steps=2, total_steps=60))

    result = loop.run(theta_v, iter(_batches(0)), steps=25)

    assert result.tokens == 25 * 4 * 32
    assert evaluate(model, val) < before - 0.5
    assert loop.step == 25
    assert loop.state_dict()["optimizer"]["state"]  # AdamW moments persist in the worker


def test_proximal_term_pulls_towards_theta_v() -> None:
    free = _delta_norm(mu=0.0)
    pulled = _delta_norm(mu=1e4)

    assert pulled < 0.2 * free


def test_evaluate_rejects_empty() -> None:
    model, _ = build_model(SMALL, LoraConfig(), VOCAB)
    with pytest.raises(ValueError, match="no validation batches"):
        evaluate(model, [])
