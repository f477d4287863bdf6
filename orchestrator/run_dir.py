"""The run directory: every file of a run by name, and the one atomic write every writer uses.

Layout under ``root`` (``sa2va-rl run --output``)::

    config.yaml              the resolved config (written once the data checks passed)
    run_id                   the run's id (its Ray actors are named under it; see run_id.py)
    data/                    the built-in synthetic angiograms (when data.path is unset)
    split_manifest.json      the train/val/test split (envs.split)
    gpu_plan.json            the GPU memory plan (GPU backends only)
    tune/                    the Tune experiment: one directory per trial, with
                             best_policy.pt and algo/ in each checkpoint
    reward_net/              best_reward_net.pt, report.json, val_predictions.csv
    status/<trial>.json      the record of each trial's RUNNING / READY / FAILED (trial_status)
    eval/                    per_image.csv and examples/<method>__<image>.png
    summary.json, report.md, plots/*.png
    logs/

Nothing else in the project spells these names.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNE_EXPERIMENT = "tune"
"""Name of the Tune experiment; its directory is ``<run dir>/tune``."""
BEST_POLICY_FILE = "best_policy.pt"
"""The exported policy inside every PPO checkpoint (and the trial directory)."""
ALGO_DIR = "algo"
"""RLlib's own state inside every PPO checkpoint (for resuming)."""
OBSERVATION_STATS_FILE = "observation_stats.json"
"""The fixed observation normalisation inside every PPO checkpoint (a resumed trial keeps it)."""


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives (all under ``root``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_id(self) -> Path:
        """The run's id (see :mod:`orchestrator.run_id`)."""
        return self.root / "run_id"

    @property
    def synthetic_data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.root / "split_manifest.json"

    @property
    def gpu_plan(self) -> Path:
        return self.root / "gpu_plan.json"

    @property
    def tune_dir(self) -> Path:
        return self.root / TUNE_EXPERIMENT

    @property
    def reward_net_dir(self) -> Path:
        return self.root / "reward_net"

    @property
    def reward_net(self) -> Path:
        return self.reward_net_dir / "best_reward_net.pt"

    @property
    def reward_net_report(self) -> Path:
        return self.reward_net_dir / "report.json"

    @property
    def reward_net_predictions(self) -> Path:
        """Predicted and true targets of the reward net's validation examples (CSV)."""
        return self.reward_net_dir / "val_predictions.csv"

    def trial_status(self, trial: str) -> Path:
        """The record of ``trial``'s RUNNING / READY / FAILED (see training.trial_status)."""
        return self.root / "status" / f"{trial}.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def per_image_csv(self) -> Path:
        return self.eval_dir / "per_image.csv"

    @property
    def train_per_image_csv(self) -> Path:
        """The policies and learners on their own training images (over-fitting shows)."""
        return self.eval_dir / "train_per_image.csv"

    @property
    def examples_dir(self) -> Path:
        """Every method's final mask of the example images (PNG)."""
        return self.eval_dir / "examples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def before_tune(self) -> tuple[Path, ...]:
        """What a run writes before Tune starts (config, data, split, GPU plan, logs)."""
        return (
            self.config,
            self.run_id,
            self.synthetic_data,
            self.manifest,
            self.gpu_plan,
            self.logs,
        )

    def is_attempt_before_tune(self) -> bool:
        """Whether ``root`` holds only what an attempt that stopped before Tune wrote (a failed
        data check or GPU plan): such a directory blocks nothing, a new run starts over in it."""
        known = set(self.before_tune())
        return not self.tune_dir.exists() and all(p in known for p in self.root.iterdir())

    def clear_attempt_before_tune(self) -> None:
        """Remove what :meth:`is_attempt_before_tune` found."""
        for path in self.before_tune():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def temp_path(path: Path) -> Path:
    """A unique hidden temporary name next to ``path`` (same directory, so a rename is atomic;
    unique, so concurrent writers on any node never share one)."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a unique temp file, fsync, then rename over
    ``path``. A reader (on any node) sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """:func:`write_bytes` for JSON (indented, with a final newline)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
