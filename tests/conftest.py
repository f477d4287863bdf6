"""Shared fixtures: one real smoke run of ``sa2va-rl run`` for every test that inspects a run.

The run uses the shipped ``tune_configs/smoke.yaml`` with the built-in data and the Frangi
backend, a local Ray on 2 logical CPUs without the dashboard, and a cache directory of its own
(so tests never read a developer's cache).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import CONFIG_DIR

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@dataclass(frozen=True)
class SmokeRun:
    """A finished smoke run: its directory, cache directory and exit code."""

    root: Path
    cache_dir: Path
    exit_code: int


def smoke_args(output: Path, cache_dir: Path, *extra: str) -> list[str]:
    """``sa2va-rl run`` arguments of a CI smoke run into ``output``."""
    return [
        "run",
        "--config",
        str(CONFIG_DIR / "smoke.yaml"),
        "--output",
        str(output),
        "--cache-dir",
        str(cache_dir),
        "--num-cpus",
        "2",
        "--no-dashboard",
        *extra,
    ]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeRun]:
    base = tmp_path_factory.mktemp("smoke")
    root, cache = base / "run", base / "cache"
    code = main(smoke_args(root, cache))
    yield SmokeRun(root, cache, code)
