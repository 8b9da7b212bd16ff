"""Base causal LM plus LoRA: deterministic tiny base weights, the travelling adapter layout,
and export of a trained adapter as a standard peft adapter directory."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from echelon.training.adapter import AdapterLayout, AdapterLayoutError, unflatten
from echelon.training.model_config import ALL_LINEAR, TINY, LoraConfig, ModelConfig

log = structlog.get_logger(__name__)

__all__ = [
    "ALL_LINEAR",
    "TINY",
    "LoraConfig",
    "ModelConfig",
    "SavedAdapter",
    "base_digest",
    "build_base",
    "build_model",
    "load_lora_state",
    "load_peft_for_generation",
    "lora_state",
    "save_peft_adapter",
]


def _tiny_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_seq,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_base(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """The base model on CPU in float32; the tiny one is identical in every process for a seed.

    Raises:
        ValueError: `vocab_size` is not positive.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size: got {vocab_size}, want > 0")
    if cfg.source == TINY:
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(cfg.seed)
            model: PreTrainedModel = LlamaForCausalLM(_tiny_config(cfg, vocab_size))
        finally:
            torch.random.set_rng_state(gen_state)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.source, dtype=torch.float32)
    model.config.use_cache = False
    return model


def base_digest(model: torch.nn.Module) -> str:
    """Hex SHA-256 over the base (non-LoRA) weights: names, shapes, dtypes and bytes, sorted."""
    h = hashlib.sha256(b"echelon.base-weights.v1\x00")
    state = model.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        canonical = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{canonical}|{tuple(tensor.shape)}|{tensor.dtype}\x00".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _peft_config(lora_cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(
    model_cfg: ModelConfig, lora_cfg: LoraConfig, vocab_size: int
) -> tuple[Any, AdapterLayout]:
    """Base model wrapped with LoRA; only the travelling LoRA parameters require grad.

    The LoRA initialisation is seeded by `lora_cfg.seed`, so every process builds the same
    initial adapter (and, with `frozen_a`, the same shared A). Returns the peft model and the
    layout of the parameters that train and travel (names sorted).
    """
    base = build_base(model_cfg, vocab_size)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(lora_cfg.seed)
        with warnings.catch_warnings():
            # peft calls a transformers method that transformers 5 has deprecated; not ours.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(base, _peft_config(lora_cfg))
    finally:
        torch.random.set_rng_state(gen_state)
    travelling: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        is_lora = "lora_A" in name or "lora_B" in name
        trains = is_lora and not (lora_cfg.frozen_a and "lora_A" in name)
        param.requires_grad_(trains)
        if trains:
            travelling[name] = param
    if not travelling:
        raise ValueError(
            f"LoraConfig.target_modules: {lora_cfg.target_modules} matched no module of the base"
        )
    layout = AdapterLayout.from_state(travelling)
    log.debug("model_built", numel=layout.numel, tensors=len(layout.entries))
    return model, layout


def lora_state(model: torch.nn.Module, layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the travelling parameters named in `layout`.

    Raises:
        AdapterLayoutError: a layout name is not a parameter of `model`.
    """
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, _ in layout.entries:
        if name not in params:
            raise AdapterLayoutError(f"model parameter {name}", expected="present", found="missing")
        out[name] = params[name].detach().to("cpu", torch.float32).clone()
    return out


@torch.no_grad()
def load_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the model's parameters of the same names (in place).

    Raises:
        AdapterLayoutError: a name is not a parameter of `model` or its shape differs.
    """
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise AdapterLayoutError(f"model parameter {name}", expected="present", found="missing")
        target = params[name]
        if tuple(target.shape) != tuple(value.shape):
            raise AdapterLayoutError(
                f"model parameter {name}.shape", expected=tuple(target.shape), found=value.shape
            )
        target.copy_(value.to(target.device, target.dtype))


@dataclass(frozen=True)
class SavedAdapter:
    """Where `save_peft_adapter` wrote things; `base_dir` is None for a non-tiny source."""

    adapter_dir: Path
    base_dir: Path | None


def save_peft_adapter(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    vocab_size: int,
    flat_vec_or_state: np.ndarray | Mapping[str, torch.Tensor],
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
) -> SavedAdapter:
    """Write `out_dir/adapter` with peft's `save_pretrained`; for the tiny source also
    `out_dir/base` (the base model and, from `tokenizer_dir`, a fast tokenizer), so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` works.

    Raises:
        AdapterLayoutError: the adapter does not match the layout of this configuration.
    """
    model, layout = build_model(model_cfg, lora_cfg, vocab_size)
    if isinstance(flat_vec_or_state, np.ndarray):
        state = unflatten(flat_vec_or_state, layout)
    else:
        state = dict(flat_vec_or_state)
        missing = sorted(set(layout.names) - set(state))
        if missing:
            raise AdapterLayoutError("adapter state", expected=layout.names, found=f"no {missing}")
    load_lora_state(model, state)
    out_dir = Path(out_dir)
    base_dir: Path | None = None
    if model_cfg.source == TINY:
        base_dir = out_dir / "base"
        # A fresh build: peft injects LoRA layers into the wrapped base in place, and those
        # must not end up in the base checkpoint. The tiny base is deterministic per seed.
        build_base(model_cfg, vocab_size).save_pretrained(str(base_dir))
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
        if tokenizer_dir is not None:
            from echelon.training.tokenizer import export_hf_tokenizer

            export_hf_tokenizer(tokenizer_dir, base_dir)
    else:
        model.peft_config["default"].base_model_name_or_path = str(Path(model_cfg.source).resolve())
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    log.info("peft_adapter_saved", adapter_dir=str(adapter_dir), base_dir=str(base_dir))
    return SavedAdapter(adapter_dir=adapter_dir, base_dir=base_dir)


def load_peft_for_generation(base_dir: Path, adapter_dir: Path) -> Any:
    """The way a user loads an exported adapter: base from its directory plus the peft adapter."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return PeftModel.from_pretrained(base, str(adapter_dir))
