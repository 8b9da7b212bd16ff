"""Flat adapter vectors: the layout of the LoRA parameters that travel, and flatten/unflatten.

This module is what the coordinator and the boundary agent use to handle adapters, so it
imports only torch, numpy and safetensors (never transformers or peft).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

_FLAT_KEY = "adapter"
_LAYOUT_META_KEY = "echelon.layout"


class AdapterLayoutError(ValueError):
    """An adapter state or vector does not match the layout; carries what was expected and found."""

    def __init__(self, what: str, *, expected: object, found: object) -> None:
        super().__init__(f"{what}: got {found}, want {expected}")
        self.what = what
        self.expected = expected
        self.found = found


@dataclass(frozen=True, kw_only=True)
class AdapterLayout:
    """Ordered (name, shape) pairs of the adapter parameters that travel between processes.

    The order is the order of the flat vector. Layouts built by `echelon.training.model`
    sort names, so every process that builds the same model gets the same layout.
    """

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.entries]
        if len(set(names)) != len(names):
            raise ValueError("AdapterLayout.entries: parameter names must be unique")
        for name, shape in self.entries:
            if not name:
                raise ValueError("AdapterLayout.entries: empty parameter name")
            if any(d <= 0 for d in shape):
                raise ValueError(f"AdapterLayout.entries[{name}]: shape {shape} must be positive")

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> AdapterLayout:
        """Layout of `state` with names sorted (the canonical order)."""
        return cls(entries=tuple((n, tuple(state[n].shape)) for n in sorted(state)))

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    def to_json(self) -> str:
        """Canonical JSON encoding (also what `digest` hashes)."""
        return json.dumps(
            [[name, list(shape)] for name, shape in self.entries], separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> AdapterLayout:
        raw = json.loads(text)
        return cls(entries=tuple((str(n), tuple(int(d) for d in s)) for n, s in raw))

    def digest(self) -> str:
        """Hex SHA-256 over the canonical JSON encoding of the layout."""
        return hashlib.sha256(
            b"echelon.adapter-layout.v1\x00" + self.to_json().encode()
        ).hexdigest()


def flatten(state: Mapping[str, torch.Tensor], layout: AdapterLayout) -> np.ndarray:
    """Concatenate `state` in layout order into one contiguous float32 vector.

    Raises:
        AdapterLayoutError: a layout name is missing from `state` or has the wrong shape.
    """
    parts: list[np.ndarray] = []
    for name, shape in layout.entries:
        if name not in state:
            raise AdapterLayoutError(f"adapter state[{name}]", expected="present", found="missing")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise AdapterLayoutError(
                f"adapter state[{name}].shape", expected=shape, found=tuple(tensor.shape)
            )
        parts.append(tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy())
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def unflatten(vec: np.ndarray, layout: AdapterLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector into float32 tensors named and shaped by `layout`.

    Raises:
        AdapterLayoutError: `vec` is not one-dimensional or its length is not `layout.numel`.
    """
    if vec.ndim != 1:
        raise AdapterLayoutError("adapter vector ndim", expected=1, found=vec.ndim)
    if vec.shape[0] != layout.numel:
        raise AdapterLayoutError("adapter vector length", expected=layout.numel, found=vec.shape[0])
    flat = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32).copy())
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout.entries:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape).clone()
        offset += size
    return out


def save_flat(path: Path, vec: np.ndarray, layout: AdapterLayout) -> None:
    """Write a flat adapter vector and its layout to one safetensors file.

    Raises:
        AdapterLayoutError: `vec` does not match `layout`.
    """
    if vec.ndim != 1 or vec.shape[0] != layout.numel:
        raise AdapterLayoutError("adapter vector length", expected=layout.numel, found=vec.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(
        {_FLAT_KEY: np.ascontiguousarray(vec, dtype=np.float32)},
        str(tmp),
        metadata={_LAYOUT_META_KEY: layout.to_json(), "echelon.layout_digest": layout.digest()},
    )
    tmp.replace(path)


def load_flat(path: Path, layout: AdapterLayout | None = None) -> tuple[np.ndarray, AdapterLayout]:
    """Read a file written by `save_flat`; when `layout` is given, check that the file matches it.

    Raises:
        AdapterLayoutError: the file's layout differs from `layout`.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if _LAYOUT_META_KEY not in metadata:
        raise AdapterLayoutError(f"{path} metadata", expected=_LAYOUT_META_KEY, found="missing")
    stored = AdapterLayout.from_json(metadata[_LAYOUT_META_KEY])
    if layout is not None and stored.digest() != layout.digest():
        raise AdapterLayoutError(
            f"{path} layout digest", expected=layout.digest(), found=stored.digest()
        )
    vec = load_file(str(path))[_FLAT_KEY]
    if vec.shape != (stored.numel,):
        raise AdapterLayoutError(f"{path} vector length", expected=stored.numel, found=vec.shape)
    return np.ascontiguousarray(vec, dtype=np.float32), stored
