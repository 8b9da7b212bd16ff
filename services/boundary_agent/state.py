"""The agent's durable protocol state (`echelon.protocol.boundary.BoundaryState`): written
atomically to its private state directory (0700, file 0600) whenever it changes, read back
at start, so that a restarted agent holds its version and its waiting deltas, and never
sends again a delta that may have been unmasked."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from echelon.protocol.boundary import BoundaryState
from echelon.protocol.events import TrainedDelta

STATE_FILE = "boundary-state.npz"


def save_state(directory: Path, state: BoundaryState) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    meta = {
        "held_version": state.held_version,
        "last_window": state.last_window,
        "lost": state.lost,
        "dropped": state.dropped,
        "pending": [
            {
                "base_version": d.base_version,
                "tokens": d.tokens,
                "devices": d.devices,
                "train_loss": d.train_loss,
            }
            for d in state.pending
        ],
    }
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if state.phi is not None:
        arrays["phi"] = state.phi
    for i, d in enumerate(state.pending):
        arrays[f"delta{i}"] = d.delta
    tmp = directory / (STATE_FILE + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)


def load_state(directory: Path) -> BoundaryState | None:
    """The saved state, or None before the first save. Raises ValueError when corrupt."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        return _read(path)
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a saved boundary state ({exc})") from exc


def _read(path: Path) -> BoundaryState:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        pending = tuple(
            TrainedDelta(
                delta=data[f"delta{i}"].astype(np.float32),
                base_version=int(p["base_version"]),
                tokens=int(p["tokens"]),
                devices=int(p["devices"]),
                train_loss=float(p["train_loss"]),
            )
            for i, p in enumerate(meta["pending"])
        )
        phi = data["phi"].astype(np.float32) if "phi" in data.files else None
    return BoundaryState(
        held_version=int(meta["held_version"]),
        phi=phi,
        pending=pending,
        last_window=int(meta["last_window"]),
        lost=int(meta["lost"]),
        dropped=int(meta["dropped"]),
    )
