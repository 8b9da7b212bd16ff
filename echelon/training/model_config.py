"""Configuration of the base model and of LoRA, importable without transformers or peft (the
agent and the pool pass these around; `echelon.training.model` builds from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TINY = "tiny"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which base model to adapt: the built-in tiny Llama (`source="tiny"`) or a local HF dir."""

    source: str = TINY
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 344
    max_seq: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source != TINY and not Path(self.source).is_dir():
            raise ValueError(
                f"ModelConfig.source: got {self.source!r}; want 'tiny' or an existing local "
                "directory that AutoModelForCausalLM.from_pretrained can read"
            )
        if min(self.layers, self.hidden, self.heads, self.intermediate, self.max_seq) <= 0:
            raise ValueError(
                "ModelConfig: layers, hidden, heads, intermediate, max_seq must be > 0"
            )
        if self.hidden % self.heads != 0:
            raise ValueError(
                f"ModelConfig.hidden: got {self.hidden}, want a multiple of heads={self.heads}"
            )


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA hyperparameters. `frozen_a`: A is shared (seeded init) and frozen; only B travels."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    frozen_a: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r: got {self.r}, want > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout: got {self.dropout}, want in [0, 1)")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules: want at least one module name")
