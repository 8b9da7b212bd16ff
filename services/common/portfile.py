"""Writes a started service's bound ports as JSON, so a launcher can find ephemeral ports."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_port_file(path: Path | None, **ports: int) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    tmp.replace(path)
