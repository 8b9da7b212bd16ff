"""Shared helpers for the deploy tests: finding the command-line tools they need.

A test that needs a tool skips, naming the tool and how to install it, when the tool is
missing; under `make test` (REQUIRE_DEPLOY_TOOLS=1) it fails instead, so a
machine that lacks a tool cannot pass the suite by skipping."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REQUIRE_ENV = "REQUIRE_DEPLOY_TOOLS"


def find_tool(name: str) -> str | None:
    """The tool's path: the virtual environment's bin/ first (pip-installed tools), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def need_tool(name: str, install: str) -> str:
    """The tool's path; skips without it, or fails when REQUIRE_DEPLOY_TOOLS=1.

    Raises pytest's skip or fail outcome when the tool is missing."""
    path = find_tool(name)
    if path is not None:
        return path
    message = f"{name} not found (install: {install})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires it")
    pytest.skip(message)
