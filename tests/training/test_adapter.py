"""Flat adapter vectors: layout, flatten/unflatten, typed errors, safetensors files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echelon.training.adapter import (
    AdapterLayout,
    AdapterLayoutError,
    flatten,
    load_flat,
    save_flat,
    unflatten,
)


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.lora_B": torch.randn(4, 2, generator=gen),
        "a.lora_A": torch.randn(2, 3, generator=gen),
        "c.lora_A": torch.randn(5, generator=gen),
    }


def test_flatten_unflatten_round_trip() -> None:
    state = _state()
    layout = AdapterLayout.from_state(state)

    vec = flatten(state, layout)
    back = unflatten(vec, layout)

    assert layout.names == ("a.lora_A", "b.lora_B", "c.lora_A")
    assert vec.dtype == np.float32 and vec.flags.c_contiguous and vec.shape == (layout.numel,)
    assert layout.numel == 6 + 8 + 5
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)


def test_flatten_missing_name_says_which() -> None:
    state = _state()
    layout = AdapterLayout.from_state(state)
    del state["b.lora_B"]

    with pytest.raises(AdapterLayoutError, match=r"b\.lora_B") as info:
        flatten(state, layout)
    assert info.value.found == "missing"


def test_flatten_wrong_shape_reports_expected_and_found() -> None:
    state = _state()
    layout = AdapterLayout.from_state(state)
    state["a.lora_A"] = torch.zeros(3, 2)

    with pytest.raises(AdapterLayoutError) as info:
        flatten(state, layout)
    assert info.value.expected == (2, 3)
    assert info.value.found == (3, 2)


def test_unflatten_wrong_length() -> None:
    layout = AdapterLayout.from_state(_state())

    with pytest.raises(AdapterLayoutError, match="got 18, want 19"):
        unflatten(np.zeros(18, dtype=np.float32), layout)


def test_digest_is_canonical_and_sensitive() -> None:
    layout = AdapterLayout.from_state(_state())
    same = AdapterLayout.from_json(layout.to_json())
    other = AdapterLayout(entries=(*layout.entries[:-1], ("c.lora_A", (6,))))

    assert same.digest() == layout.digest()
    assert other.digest() != layout.digest()
    assert len(layout.digest()) == 64


def test_layout_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        AdapterLayout(entries=(("x", (1,)), ("x", (2,))))


def test_save_load_flat(tmp_path: Path) -> None:
    state = _state()
    layout = AdapterLayout.from_state(state)
    vec = flatten(state, layout)
    path = tmp_path / "adapter.safetensors"

    save_flat(path, vec, layout)
    loaded, stored = load_flat(path, layout)

    assert np.array_equal(loaded, vec)
    assert stored == layout
    wrong = AdapterLayout(entries=(("z", (19,)),))
    with pytest.raises(AdapterLayoutError, match="layout digest"):
        load_flat(path, wrong)


def test_agent_side_modules_do_not_import_transformers() -> None:
    code = (
        "import sys, echelon.training.adapter, echelon.device.pool; "
        "bad = [m for m in ('transformers', 'peft') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
