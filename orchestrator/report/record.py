"""Reading a finished run back from its directory: everything the report is made of.

No model and no Ray cluster are needed: the Tune experiment is read with
:class:`ray.tune.ExperimentAnalysis` from disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envs.split import read_manifest
from models.errors import UserError
from orchestrator.config import RunConfig, parse_config
from orchestrator.evaluation.per_image import ImageResult, read_rows
from orchestrator.run_dir import RunPaths
from orchestrator.training.reward_predictions import (
    RewardNetPredictions,
    read_reward_net_predictions,
)

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_FACTS = ("mode", "backend", "splits", "trials", "inference", "stage_seconds")


@dataclass(frozen=True)
class TuneTrial:
    """One trial of the Tune experiment as read back from disk.

    Attributes:
        name: prompt, postprocess, reward_net or reward_guided.
        status: Tune's status (TERMINATED, ERROR, ...).
        directory: the trial directory, relative to the run directory.
        error_file: its ``error.txt`` relative to the run directory, when one exists.
        results: one row per reported result (Tune's ``trial_dataframes``).
    """

    name: str
    status: str
    directory: str
    error_file: str | None
    results: pd.DataFrame

    def last(self, key: str) -> float | None:
        """The last non-missing value of a result column, if any."""
        if key not in self.results:
            return None
        values = self.results[key].dropna()
        return float(values.iloc[-1]) if len(values) else None


@dataclass(frozen=True)
class RunRecord:
    """Everything the report is made of, read from a run directory."""

    paths: RunPaths
    facts: dict[str, Any]
    config: RunConfig
    rows: list[ImageResult]
    trials: list[TuneTrial]
    train_rows: list[ImageResult]
    """The learned methods on their training images (empty for runs made before it existed)."""
    val_rows: list[ImageResult]
    """Every method but the oracles on the val split (empty for runs made before it existed)."""
    groups: dict[str, str]
    """Image id -> its video (the split manifest's groups): what the video-level CIs resample."""
    reward_net: dict[str, Any] | None
    predictions: RewardNetPredictions | None


def _not_finished(paths: RunPaths, missing: Path, what: str) -> UserError:
    return UserError(
        f"{paths.root} is not a finished run: {missing} is missing ({what}); finish it with "
        f"`sa2va-rl run --output {paths.root} --resume`"
    )


def load_run(root: Path) -> RunRecord:
    """Read every input of the report; a missing one is a :class:`UserError` naming it."""
    paths = RunPaths(Path(root).expanduser().resolve())
    if not paths.root.is_dir():
        raise UserError(
            f"run directory {paths.root} does not exist; pass a `sa2va-rl run --output`"
        )
    required = {
        paths.config: "the run's config",
        paths.summary: "written when a run finishes",
        paths.per_image_csv: "written by the evaluation stage",
        paths.tune_dir: "the Tune experiment",
    }
    for path, what in required.items():
        if not path.exists():
            raise _not_finished(paths, path, what)
    try:
        facts = json.loads(paths.summary.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{paths.summary} is not valid JSON ({err}); finish the run with "
            f"`sa2va-rl run --output {paths.root} --resume`"
        ) from None
    absent = [key for key in REQUIRED_FACTS if key not in facts]
    if absent:
        raise UserError(
            f"{paths.summary} lacks {absent}: it was not written by a finished run; finish it "
            f"with `sa2va-rl run --output {paths.root} --resume`"
        )
    predictions_path = paths.reward_net_predictions
    return RunRecord(
        paths=paths,
        facts=facts,
        config=load_run_config(paths),
        rows=read_rows(paths.per_image_csv),
        train_rows=_optional_rows(paths.train_per_image_csv),
        val_rows=_optional_rows(paths.val_per_image_csv),
        groups=_groups(paths),
        trials=read_tune_trials(paths),
        reward_net=(
            json.loads(paths.reward_net_report.read_text())
            if paths.reward_net_report.is_file()
            else None
        ),
        predictions=(
            read_reward_net_predictions(predictions_path) if predictions_path.is_file() else None
        ),
    )


def _groups(paths: RunPaths) -> dict[str, str]:
    if not paths.manifest.is_file():
        raise _not_finished(paths, paths.manifest, "the split, whose videos the CIs resample")
    return read_manifest(paths.manifest).groups


def _optional_rows(path: Path) -> list[ImageResult]:
    return read_rows(path) if path.is_file() else []


def load_run_config(paths: RunPaths) -> RunConfig:
    import yaml

    return parse_config(yaml.safe_load(paths.config.read_text()), source=str(paths.config))


def read_tune_trials(paths: RunPaths) -> list[TuneTrial]:
    """The run's trials from its Tune experiment directory (no Ray cluster needed)."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(paths.tune_dir))
    except Exception as err:  # Tune raises several types for an unreadable experiment
        raise UserError(
            f"cannot read the Tune experiment {paths.tune_dir} ({type(err).__name__}: {err}); "
            f"finish the run with `sa2va-rl run --output {paths.root} --resume`"
        ) from None
    frames = analysis.trial_dataframes
    trials = []
    for trial in analysis.trials:
        directory = Path(str(trial.path))
        error = directory / "error.txt"
        trials.append(
            TuneTrial(
                name=str(trial.config["trial"]),
                status=str(trial.status),
                directory=relative(directory, paths.root),
                error_file=relative(error, paths.root) if error.is_file() else None,
                results=frames.get(trial.trial_id, pd.DataFrame()),
            )
        )
    return sorted(trials, key=lambda t: t.name)


def relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
