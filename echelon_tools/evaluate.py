"""Held-out evaluation and sampling for a finished run, done the way each organization
would do it on its own machine: its own held-out text, the initial and the final
global adapter, and a few tokens generated from the exported peft adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from echelon.tomlconfig import load_toml
from echelon.training.adapter import unflatten
from echelon.training.data import fixed_batches, load_blocks, split_train_val
from echelon.training.inner import evaluate
from echelon.training.model import load_lora_state
from echelon.training.tokenizer import load_tokenizer
from echelon_tools.export import export_version
from echelon_tools.launcher import Deployment
from services.boundary_agent.__main__ import load_setup
from services.boundary_agent.training import initial_model
from services.global_coordinator.store import stored_adapter


def heldout_losses(
    deployment: Deployment, orgs: list[str], max_batches: int = 16
) -> dict[str, tuple[float, float]]:
    """Validation loss per organization under the initial and the latest global adapter."""
    _, phi = stored_adapter(deployment.coordinator_state)
    out: dict[str, tuple[float, float]] = {}
    for org in orgs:
        config = deployment.agent_config(org)
        setup = load_setup(load_toml(config), config.parent)
        tokenizer = load_tokenizer(deployment.spec.root / org / "tokenizer")
        model, layout, theta0 = initial_model(setup, tokenizer.vocab_size)
        blocks = load_blocks(setup.data, tokenizer)
        _, val = split_train_val(blocks, setup.data.val_fraction, setup.data.seed)
        batches = fixed_batches(val, 8, max_batches)
        losses = []
        for theta in (theta0, theta0 + phi):
            load_lora_state(model, unflatten(theta.astype(np.float32), layout))
            losses.append(evaluate(model, batches))
        out[org] = (losses[0], losses[1])
    return out


def generate_sample(deployment: Deployment, org: str, out_dir: Path, tokens: int = 24) -> str:
    """Exports the latest version as a peft adapter and samples from it (seeded, top-k 20)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    exported = export_version(
        coordinator_state=deployment.coordinator_state,
        agent_config=deployment.agent_config(org),
        out_dir=out_dir,
    )
    base_dir = exported.base_dir or exported.base_source
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft's
        model = PeftModel.from_pretrained(base, str(exported.adapter_dir))
    prompt = "In the beginning"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        generated = model.generate(  # type: ignore[no-untyped-call]
            ids,
            max_new_tokens=tokens,
            do_sample=True,
            top_k=20,
            temperature=0.7,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(generated[0], skip_special_tokens=True))
