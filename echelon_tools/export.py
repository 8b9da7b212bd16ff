"""`echelon export`: writes a stored global adapter version as a standard peft adapter.

The coordinator stores each version as an offset from the shared initial adapter;
this rebuilds the initial adapter from a boundary's model configuration, adds the
offset, and saves a directory that `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echelon.tomlconfig import load_toml
from echelon.training.model import save_peft_adapter
from echelon.training.tokenizer import obtain_tokenizer
from services.boundary_agent.__main__ import load_setup
from services.boundary_agent.training import initial_model
from services.global_coordinator.store import stored_adapter


@dataclass(frozen=True)
class Exported:
    version: int
    adapter_dir: Path
    base_dir: Path | None  # where the tiny base model was written; None for a local model
    base_source: Path | None  # the local base model directory the adapter applies to


def export_version(
    *, coordinator_state: Path, agent_config: Path, out_dir: Path, version: int | None = None
) -> Exported:
    """Writes `version` (default: the latest) under `out_dir`. Raises KeyError if absent."""
    chosen, phi = stored_adapter(coordinator_state, version)
    tables = load_toml(agent_config)
    setup = load_setup(tables, agent_config.parent)
    work = Path(tables.get("service", {}).get("data_dir", out_dir / "work"))
    if not work.is_absolute():
        work = agent_config.parent / work
    tokenizer = obtain_tokenizer(setup.tokenizer, work / "tokenizer")
    _, _, theta0 = initial_model(setup, tokenizer.vocab_size)
    if phi.shape != theta0.shape:
        raise ValueError(f"stored version {chosen}: {phi.size} values, model has {theta0.size}")
    saved = save_peft_adapter(
        setup.model,
        setup.lora,
        tokenizer.vocab_size,
        (theta0 + phi).astype(np.float32),
        out_dir,
        tokenizer_dir=work / "tokenizer",
    )
    source = None if setup.model.source == "tiny" else Path(setup.model.source)
    return Exported(chosen, saved.adapter_dir, saved.base_dir, source)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="echelon export", description=__doc__)
    parser.add_argument(
        "--coordinator-state",
        type=Path,
        required=True,
        help="the coordinator's state directory (DATA_DIR/state)",
    )
    parser.add_argument(
        "--agent-config",
        type=Path,
        required=True,
        help="a boundary agent's TOML (for the model, LoRA and tokenizer)",
    )
    parser.add_argument("--version", type=int, help="version to export (default: latest)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        done = export_version(
            coordinator_state=args.coordinator_state,
            agent_config=args.agent_config,
            out_dir=args.out,
            version=args.version,
        )
    except (KeyError, ValueError) as exc:
        print(f"echelon export: {exc}")
        return 1
    base = done.base_dir or done.base_source
    print(f"exported version {done.version} to {done.adapter_dir} (base model: {base})")
    return 0
