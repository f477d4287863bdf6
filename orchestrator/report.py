"""Evaluation of a finished run, ``summary.json``, ``report.md`` and the plots.

Two halves:

- :func:`evaluate_run` (needs the segmenter and the trained policies) evaluates every method on
  the test split and writes ``eval/per_image.csv`` and the example masks ``eval/examples/*.png``.
- :func:`write_report` (needs no model and no Ray) rebuilds ``summary.json``'s ``methods``,
  ``report.md`` and ``plots/*.png`` from files only: the per-image CSV, the example masks and
  the dataset images, the reward net's ``report.json`` and ``val_predictions.csv``, the Tune
  experiment (read with :class:`ray.tune.ExperimentAnalysis`) and the run facts already in
  ``summary.json``. The run calls it, and so does ``sa2va-rl report RUN_DIR``; being a pure
  function of those files, it rebuilds every report file byte for byte.

Nothing in the report names the run directory's absolute path, so a moved run still rebuilds
to the same bytes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from envs.sources import load_samples
from models.errors import UserError
from models.reward_net import TARGETS
from orchestrator import metric_keys as mk
from orchestrator.config import RunConfig, parse_config
from orchestrator.evaluation import (
    EXAMPLE_ROLES,
    METHOD_OF_TRIAL,
    METHODS,
    Estimate,
    ImageResult,
    MethodSummary,
    best_fixed_prompt,
    example_mask_path,
    make_evaluator,
    pick_examples,
    read_mask_png,
    summarise,
    verdict,
)
from orchestrator.experiments import RunPaths, env_kwargs, make_env

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PER_IMAGE_CSV = "per_image.csv"
EXAMPLES_DIR = "examples"
REWARD_NET_PREDICTIONS = "val_predictions.csv"
"""Written next to the reward net's ``report.json`` by its trial: predicted and true targets."""
TARGET = {"dice": 0.85, "recall": 0.85}
"""The users' goal (SEEDS.md): Dice and Recall of at least 0.85."""
RL_METHODS = ("prompt_rl", "postprocess_rl", "reward_rl", "combined")
PPO_TRIALS = ("prompt", "postprocess", "reward_guided")
PLOT_DPI = 100
PLOT_SIZES = {
    "metrics.png": (11.0, 4.8),
    "learning_curves.png": (11.0, 9.0),
    "reward_net_dice.png": (6.0, 6.0),
    "examples.png": (12.0, 9.6),
}
"""Every plot's file name (under ``plots/``) and size in inches; pixels = inches * PLOT_DPI."""
REQUIRED_FACTS = ("mode", "backend", "splits", "trials", "inference", "stage_seconds")


# --- evaluation (needs the segmenter) ------------------------------------------------------------
def best_policy_paths(grid: Any) -> dict[str, Path]:
    """Trial -> ``best_policy.pt`` of its latest checkpoint, for PPO trials that have one."""
    from orchestrator.trainable import BEST_POLICY_FILE

    found = {}
    for result in grid:
        trial = str(result.config["trial"])
        if trial in METHOD_OF_TRIAL and result.checkpoint is not None:
            path = Path(result.checkpoint.path) / BEST_POLICY_FILE
            if path.is_file():
                found[trial] = path
    return found


def evaluate_run(
    config: RunConfig, paths: RunPaths, prepared: Any, segmenter: Any, grid: Any
) -> list[ImageResult]:
    """Every method on the test split; writes ``eval/per_image.csv`` and the example masks
    (every method's final mask of the worst, median and best baseline image)."""
    from orchestrator.ppo import ExportedPolicy

    data = {"data": prepared.data_dir, "manifest": paths.manifest}
    test = load_samples(**data, split="test", max_images=config.data.max_eval_images)
    train = load_samples(**data, split="train", max_images=config.data.max_train_images)
    examples = paths.eval_dir / EXAMPLES_DIR
    shutil.rmtree(examples, ignore_errors=True)  # a resumed run must not mix in stale masks
    evaluator = make_evaluator(config, test, segmenter, examples_dir=examples)
    policies = {t: ExportedPolicy.load(p).act for t, p in best_policy_paths(grid).items()}
    envs = {
        trial: make_env(
            {
                "trial": trial,
                "segmenter": segmenter,
                "kwargs": env_kwargs(
                    trial,
                    config,
                    {"samples": test},
                    reward_net=str(paths.reward_net),
                    backend_id=segmenter.backend_id,
                    manifest_hash=prepared.manifest_hash,
                ),
            }
        )
        for trial in policies
    }
    fixed = best_fixed_prompt(train, segmenter, config.env.prompts)
    # The baseline goes first: it picks the example images the later methods save masks of.
    steps: list[tuple[str, Callable[[], list[ImageResult]]]] = [
        ("baseline", evaluator.baseline),
        ("best_fixed_prompt", lambda: evaluator.fixed_prompt("best_fixed_prompt", fixed)),
    ]
    for trial, policy in policies.items():
        method = METHOD_OF_TRIAL[trial]
        steps.append((method, functools.partial(evaluator.policy, method, envs[trial], policy)))
    if "prompt" in policies and "postprocess" in policies:
        steps.append(
            (
                "combined",
                lambda: evaluator.combined(
                    envs["prompt"], policies["prompt"], envs["postprocess"], policies["postprocess"]
                ),
            )
        )
    steps += [
        ("oracle_prompt", evaluator.oracle_prompt),
        ("oracle_postprocess", evaluator.oracle_postprocess),
    ]
    rows: list[ImageResult] = []
    for method, compute in steps:
        start = time.monotonic()
        rows += compute()
        print(f"  {method:20s} {len(test)} images in {time.monotonic() - start:.1f} s", flush=True)
    write_rows(paths.eval_dir / PER_IMAGE_CSV, rows)
    return rows


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_rows(path: Path, rows: Sequence[ImageResult]) -> None:
    """The per-image CSV; floats as ``repr`` so reading them back gives the same numbers."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [f.name for f in fields(ImageResult)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in asdict(row).items()})
    _write_atomic(path, buffer.getvalue())


def read_rows(path: Path) -> list[ImageResult]:
    """Rows written by :func:`write_rows`, in file order."""
    with path.open(newline="") as handle:
        return [
            ImageResult(
                method=r["method"],
                image_id=r["image_id"],
                dice=float(r["dice"]),
                recall=float(r["recall"]),
                precision=float(r["precision"]),
                iou=float(r["iou"]),
                detail=r["detail"],
            )
            for r in csv.DictReader(handle)
        ]


# --- the reward net's validation predictions (written by its trial) -----------------------------
class RewardNetPredictions(NamedTuple):
    """Validation examples of the reward net: ids, predicted and true (N, 3) targets, with
    columns in :data:`models.reward_net.TARGETS` order (dice, recall, precision)."""

    image_ids: list[str]
    predicted: np.ndarray
    true: np.ndarray


def reward_net_predictions_path(paths: RunPaths) -> Path:
    return paths.reward_net_report.with_name(REWARD_NET_PREDICTIONS)


def write_reward_net_predictions(path: Path, predictions: RewardNetPredictions) -> None:
    """``image_id, predicted_<t>, true_<t>`` per validation example (floats as ``repr``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["image_id", *[f"{kind}_{t}" for t in TARGETS for kind in ("predicted", "true")]]
    )
    for i, image_id in enumerate(predictions.image_ids):
        values = [
            repr(float(array[i, j]))
            for j in range(len(TARGETS))
            for array in (predictions.predicted, predictions.true)
        ]
        writer.writerow([image_id, *values])
    _write_atomic(path, buffer.getvalue())


def read_reward_net_predictions(path: Path) -> RewardNetPredictions:
    """What :func:`write_reward_net_predictions` wrote."""
    with path.open(newline="") as handle:
        records = list(csv.DictReader(handle))

    def column(kind: str) -> np.ndarray:
        return np.array(
            [[float(r[f"{kind}_{t}"]) for t in TARGETS] for r in records], dtype=np.float64
        ).reshape(len(records), len(TARGETS))

    return RewardNetPredictions(
        [r["image_id"] for r in records], column("predicted"), column("true")
    )


# --- summary.json --------------------------------------------------------------------------------
def build_summary(
    config: RunConfig,
    prepared: Any,
    grid: Any,
    inference: dict[str, Any],
    stage_seconds: dict[str, float],
    started: float,
    backend_id: str | None = None,
) -> dict[str, Any]:
    """The run facts of ``summary.json``; ``methods`` stays empty until :func:`write_report`
    fills it from the per-image CSV."""
    total = inference["total"]
    trials = {str(r.config["trial"]): _status(r) for r in grid}
    return {
        "mode": config.mode,
        "backend": config.backend.name,
        "backend_id": backend_id or inference.get("backend_id"),
        "data": {
            "path": prepared.data_dir,
            "builtin": config.data.path is None,
            "manifest_hash": prepared.manifest_hash,
        },
        "splits": prepared.split_sizes,
        "trials": trials,
        "methods": {},
        "inference": {
            "forward_passes": total["forward_passes"],
            "distinct_pairs": total["distinct_pairs"],
            "cache_hits": total["memory_hits"] + total["disk_hits"],
            "disk_hits": total["disk_hits"],
            "workers": total["workers"],
            "oom_retries": total["oom_retries"],
            "restarts": total["restarts"],
            "latency_ms_p95": total.get("latency_ms_p95_worst"),
        },
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def _status(result: Any) -> str:
    return "ERROR" if result.error is not None else "TERMINATED"


def _estimate_json(e: Estimate) -> dict[str, Any]:
    return {"mean": round(e.mean, 6), "ci95": [round(e.low, 6), round(e.high, 6)]}


def methods_json(summaries: Mapping[str, MethodSummary]) -> dict[str, Any]:
    """``summary.json``'s ``methods``: means, 95% CIs and paired differences per method."""
    out = {}
    for method in [m for m in METHODS if m in summaries]:
        s = summaries[method]
        entry: dict[str, Any] = {
            "n": s.n,
            **{name: round(e.mean, 6) for name, e in s.metrics.items()},
            "ci95": {name: [round(e.low, 6), round(e.high, 6)] for name, e in s.metrics.items()},
        }
        for reference, diffs in s.paired.items():
            entry[f"vs_{reference}"] = {name: _estimate_json(e) for name, e in diffs.items()}
        out[method] = entry
    return out


# --- reading a finished run ----------------------------------------------------------------------
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
        paths.eval_dir / PER_IMAGE_CSV: "written by the evaluation stage",
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
    predictions_path = reward_net_predictions_path(paths)
    return RunRecord(
        paths=paths,
        facts=facts,
        config=load_run_config(paths),
        rows=read_rows(paths.eval_dir / PER_IMAGE_CSV),
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
                directory=_relative(directory, paths.root),
                error_file=_relative(error, paths.root) if error.is_file() else None,
                results=frames.get(trial.trial_id, pd.DataFrame()),
            )
        )
    return sorted(trials, key=lambda t: t.name)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# --- the report ----------------------------------------------------------------------------------
def write_report(paths: RunPaths) -> dict[str, Any]:
    """Rebuild ``summary.json`` (its ``methods``), ``report.md`` and ``plots/*.png`` from the
    run's files; returns the summary. Byte-identical for identical inputs."""
    record = load_run(paths.root)
    summaries = summarise(record.rows)
    summary = {**record.facts, "methods": methods_json(summaries)}
    _write_atomic(record.paths.summary, json.dumps(summary, indent=2) + "\n")
    plots = write_plots(record, summaries)
    _write_atomic(record.paths.report, render_report(record, summary, summaries, plots))
    return summary


def rebuild(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``sa2va-rl report RUN_DIR``: :func:`write_report` for a finished run's directory."""
    return write_report(RunPaths(Path(root).expanduser().resolve()))


def comparison_table(summary: dict[str, Any]) -> str:
    """The final table printed at the end of a run (plain text)."""
    lines = [
        f"{'method':20s} {'n':>4s} {'Dice':>7s} {'Recall':>7s} {'Precision':>9s} {'IoU':>7s}   "
        "Dice vs baseline [95% CI]"
    ]
    for method, m in summary["methods"].items():
        diff = m.get("vs_baseline", {}).get("dice")
        change = ""
        if diff and method != "baseline":
            change = f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        lines.append(
            f"{method:20s} {m['n']:4d} {m['dice']:7.3f} {m['recall']:7.3f} "
            f"{m['precision']:9.3f} {m['iou']:7.3f}   {change}"
        )
    return "\n".join(lines)


def best_method(summaries: Mapping[str, MethodSummary]) -> str:
    """The non-oracle method with the highest mean Dice (the baseline if it is the only one)."""
    candidates = [m for m in summaries if not m.startswith("oracle") and m != "baseline"]
    if not candidates:
        return "baseline"
    return max(candidates, key=lambda m: (summaries[m].metrics["dice"].mean, m))


# --- report.md -----------------------------------------------------------------------------------
def _ci(e: Estimate) -> str:
    return f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"


def _diff(e: Estimate) -> str:
    return f"{e.mean:+.3f} [{e.low:.3f}, {e.high:.3f}]"


def _ordered(summaries: Mapping[str, MethodSummary]) -> list[MethodSummary]:
    return [summaries[m] for m in METHODS if m in summaries]


def render_report(
    record: RunRecord,
    summary: dict[str, Any],
    summaries: Mapping[str, MethodSummary],
    plots: Mapping[str, str | None],
) -> str:
    """The text of ``report.md``."""
    sections = [
        _header(record, summary, summaries),
        _in_short(summaries),
        _results_table(summaries),
        _verdicts(record, summaries),
        _goal(summaries),
        _ceilings(summaries),
        _reward_net_section(record),
        _trials_section(record),
        _tune_snippet(),
        _inference_section(summary),
        _stages_section(summary),
        _plots_section(plots),
    ]
    return "\n\n".join(s.rstrip("\n") for s in sections) + "\n"


def _data_line(record: RunRecord) -> str:
    data = record.facts.get("data") or {}
    if record.config.data.path is None:
        return "built-in synthetic angiograms (`data/` in this run directory)"
    return f"`{data.get('path', record.config.data.path)}`"


def _header(
    record: RunRecord, summary: dict[str, Any], summaries: Mapping[str, MethodSummary]
) -> str:
    splits = summary["splits"]
    lines = [
        f"# sa2va-rl run: {summary['mode']} mode, {summary['backend']} backend",
        "",
        f"- **Data**: {_data_line(record)}",
        f"- **Splits** (images, split by video): train {splits['train']}, val {splits['val']}, "
        f"test {splits['test']}; {_images_line(record, splits['test'])}",
        f"- **Backend id**: `{summary.get('backend_id')}`",
        f'- **Baseline**: the default prompt "{record.config.env.default_prompt}", '
        "no post-processing",
    ]
    fixed = [r.detail for r in record.rows if r.method == "best_fixed_prompt"]
    if fixed:
        lines.append(f'- **best_fixed_prompt**: "{fixed[0]}" (best mean Dice on the train split)')
    lines.append(
        "- Per-image results: `eval/per_image.csv`; means with 95% bootstrap CIs (2,000 "
        "resamples); differences are paired (same images)"
    )
    return "\n".join(lines)


def _images_line(record: RunRecord, n_test: int) -> str:
    ids: dict[str, set[str]] = {}
    for row in record.rows:
        ids.setdefault(row.method, set()).add(row.image_id)
    if len({frozenset(v) for v in ids.values()}) > 1:
        return "**the methods were evaluated on different images**: compare with care"
    n = len(next(iter(ids.values()), set()))
    if n < n_test:
        return (
            f"every method is evaluated on the same {n} of the {n_test} test images "
            "(capped by data.max_eval_images)"
        )
    return f"every method is evaluated on the same {n} test images"


def _in_short(summaries: Mapping[str, MethodSummary]) -> str:
    """The answer to "which experiment improves Dice and Recall, and is it real?"."""

    def significant(reference: str, metric: str) -> list[str]:
        return [
            m
            for m in RL_METHODS
            if m in summaries
            and reference in summaries[m].paired
            and verdict(summaries[m].paired[reference][metric]) == "better"
        ]

    def names(methods: list[str]) -> str:
        return ", ".join(methods) if methods else "none"

    lines = ["## In short", ""]
    if "baseline" in summaries:
        lines.append(
            f"- RL methods significantly better than the baseline on Dice: "
            f"{names(significant('baseline', 'dice'))}; on Recall: "
            f"{names(significant('baseline', 'recall'))}"
        )
    if "best_fixed_prompt" in summaries:
        lines.append(
            "- RL methods significantly better than the best fixed prompt on Dice: "
            f"{names(significant('best_fixed_prompt', 'dice'))}"
        )
    if "baseline" in summaries:
        best = best_method(summaries)
        dice = summaries[best].metrics["dice"].mean
        lines.append(f"- Highest mean Dice without ground truth: {best} ({dice:.3f})")
    return "\n".join(lines)


def _results_table(summaries: Mapping[str, MethodSummary]) -> str:
    lines = [
        "## Results on the test split",
        "",
        "Mean [95% CI] per method.",
        "",
        "| method | n | Dice | Recall | Precision | IoU |",
        "|---|---:|---|---|---|---|",
    ]
    for s in _ordered(summaries):
        m = s.metrics
        lines.append(
            f"| {s.method} | {s.n} | {_ci(m['dice'])} | {_ci(m['recall'])} | "
            f"{_ci(m['precision'])} | {_ci(m['iou'])} |"
        )
    return "\n".join(lines)


def _missing_methods(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> list[str]:
    status = record.facts["trials"]
    lines = []
    for trial, method in METHOD_OF_TRIAL.items():
        if method not in summaries and trial in status:
            lines.append(
                f"- {method}: not evaluated (trial `{trial}` is {status[trial]}, no policy)"
            )
    return lines


def _verdicts(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> str:
    lines = [
        "## Verdicts",
        "",
        "Paired difference to the baseline (method minus baseline, per image) with its 95% CI; "
        "a difference is significant when its CI excludes 0.",
        "",
    ]
    for s in _ordered(summaries):
        if s.method == "baseline" or "baseline" not in s.paired:
            continue
        dice, recall = s.paired["baseline"]["dice"], s.paired["baseline"]["recall"]
        lines.append(
            f"- {s.method}: {_diff(dice)} Dice vs baseline — {verdict(dice)}; "
            f"Recall {_diff(recall)} — {verdict(recall)}"
        )
    lines += _missing_methods(record, summaries)
    lines += ["", "**Does RL beat the best fixed prompt?**", ""]
    lines += _vs_best_fixed(summaries)
    return "\n".join(lines)


def _vs_best_fixed(summaries: Mapping[str, MethodSummary]) -> list[str]:
    if "best_fixed_prompt" not in summaries:
        return ["- best_fixed_prompt was not evaluated."]
    lines = []
    for method in RL_METHODS:
        s = summaries.get(method)
        if s is None or "best_fixed_prompt" not in s.paired:
            continue
        dice = s.paired["best_fixed_prompt"]["dice"]
        outcome = {
            "better": "beats it",
            "worse": "is worse than it",
            "no significant difference": "does not beat it significantly",
        }[verdict(dice)]
        lines.append(f"- {method} {outcome}: {_diff(dice)} Dice vs best_fixed_prompt.")
    return lines or ["- no RL method was evaluated."]


def _goal(summaries: Mapping[str, MethodSummary]) -> str:
    goal = " and ".join(f"{name.capitalize()} >= {value}" for name, value in TARGET.items())
    reached = [
        s.method
        for s in _ordered(summaries)
        if all(s.metrics[name].mean >= value for name, value in TARGET.items())
    ]
    real = [m for m in reached if not m.startswith("oracle")]
    lines = [f"## Goal: {goal}", ""]
    if real:
        lines.append(f"Reached (mean over the test images) by: {', '.join(real)}.")
    else:
        lines.append("No non-oracle method reaches the goal (mean over the test images).")
    candidates = [s for s in _ordered(summaries) if not s.method.startswith("oracle")]
    if candidates:
        top = max(candidates, key=lambda s: (s.metrics["dice"].mean, s.method))
        lines.append(
            f"Highest non-oracle Dice: {top.method}, Dice {top.metrics['dice'].mean:.3f}, "
            f"Recall {top.metrics['recall'].mean:.3f}."
        )
    oracles = [m for m in reached if m.startswith("oracle")]
    if oracles:
        lines.append(f"Ceilings that reach it: {', '.join(oracles)}.")
    return "\n".join(lines)


def _ceilings(summaries: Mapping[str, MethodSummary]) -> str:
    lines = [
        "## Ceilings",
        "",
        "`oracle_prompt` picks the best prompt per image by ground truth; `oracle_postprocess` "
        "searches every post-processing sequence up to the episode length from the baseline "
        "mask. Neither can run without ground truth: they say how far prompt choice and "
        "post-processing *could* go on these images.",
        "",
    ]
    base = summaries.get("baseline")
    oracles = [o for o in ("oracle_prompt", "oracle_postprocess") if o in summaries]
    if base is None or not oracles:
        return "\n".join([*lines, "Not available (baseline or oracles not evaluated)."])
    base_dice = base.metrics["dice"].mean
    for o in oracles:
        e = summaries[o].metrics["dice"]
        lines.append(f"- {o}: Dice {_ci(e)}, {e.mean - base_dice:+.3f} over the baseline")
    lines += [
        "",
        "Share of the baseline -> ceiling Dice gap each method closes (negative: it moves away):",
        "",
        "| method | Dice vs baseline | " + " | ".join(f"of {o} gap" for o in oracles) + " |",
        "|---|---:|" + "---:|" * len(oracles),
    ]
    for method in ("best_fixed_prompt", *RL_METHODS):
        if method not in summaries:
            continue
        gain = summaries[method].metrics["dice"].mean - base_dice
        cells = []
        for o in oracles:
            gap = summaries[o].metrics["dice"].mean - base_dice
            cells.append(f"{100 * gain / gap:.0f}%" if gap > 1e-9 else "n/a (no gap)")
        lines.append(f"| {method} | {gain:+.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reward_net_section(record: RunRecord) -> str:
    lines = ["## Reward network (experiment 3, step 1)", ""]
    report = record.reward_net
    if report is None:
        return "\n".join([*lines, "No reward network in this run (`reward_net/report.json`)."])
    lines += [
        f"Validation on {report['n_val']} (image, mask) examples of the val split, after "
        f"{report['epochs']} epoch(s) on {report['n_train']} training examples; the mean predictor "
        "always predicts the training mean (its Pearson and Spearman are 0).",
        "",
        "| target | MAE | mean-predictor MAE | Pearson | Spearman | beats the mean predictor |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, t in report["targets"].items():
        beats = t["mae"] < t["mean_predictor_mae"] and t["spearman"] > 0
        lines.append(
            f"| {name} | {t['mae']:.4f} | {t['mean_predictor_mae']:.4f} | {t['pearson']:+.3f} | "
            f"{t['spearman']:+.3f} | {'yes' if beats else 'no'} |"
        )
    dice = report["targets"]["dice"]
    if dice["mae"] < dice["mean_predictor_mae"] and dice["spearman"] > 0:
        lines += ["", "On Dice the reward net is better than the mean predictor."]
    else:
        lines += [
            "",
            "On Dice the reward net does **not** beat the mean predictor (lower MAE and a "
            "positive Spearman are both needed): `reward_rl` optimises a poor stand-in for "
            "Dice.",
        ]
    return "\n".join(lines)


def _trials_section(record: RunRecord) -> str:
    lines = [
        "## Trials (Tune)",
        "",
        "`eval/dice` and `eval/recall` are each PPO trial's own evaluation of its best policy on "
        "the same test images (reported into its Tune results).",
        "",
        "| trial | status | iterations | env steps | eval/dice | eval/recall |",
        "|---|---|---:|---:|---:|---:|",
    ]
    errors = []
    for t in record.trials:
        cells = [
            _num(t.last("training_iteration"), "{:.0f}"),
            _num(t.last(mk.ENV_STEPS), "{:.0f}"),
            _num(t.last(mk.EVAL_DICE), "{:.3f}"),
            _num(t.last(mk.EVAL_RECALL), "{:.3f}"),
        ]
        lines.append(f"| {t.name} | {t.status} | " + " | ".join(cells) + " |")
        if t.status == "ERROR":
            where = f"`{t.error_file}`" if t.error_file else f"`{t.directory}` (no error.txt)"
            errors.append(f"- **Trial `{t.name}` failed** (ERROR): see {where}.")
    return "\n".join([*lines, "", *errors] if errors else lines)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or math.isnan(value) else fmt.format(value)


TUNE_SNIPPET = """\
from pathlib import Path

from ray import tune

grid = tune.ResultGrid(tune.ExperimentAnalysis(str(Path("tune").resolve())))
df = grid.get_dataframe()  # one row per trial: its last result
print(df[["config/trial", "eval/dice", "eval/recall"]].dropna())
"""
"""Compares the experiments from Tune's results; runs in the run directory (tested)."""


def _tune_snippet() -> str:
    return "\n".join(
        [
            "Compare the experiments yourself from Tune's results (run it in the run directory; "
            "Tune wants an absolute path):",
            "",
            "```python",
            TUNE_SNIPPET.rstrip("\n"),
            "```",
        ]
    )


def _inference_section(summary: dict[str, Any]) -> str:
    inf = summary["inference"]
    asked = inf["forward_passes"] + inf["cache_hits"]
    rate = f" ({100 * inf['cache_hits'] / asked:.0f}% of requests)" if asked else ""
    p95 = inf.get("latency_ms_p95")
    lines = [
        "## Inference",
        "",
        f"- forward passes: {inf['forward_passes']} "
        f"(distinct (image, prompt) pairs: {inf['distinct_pairs']})",
        f"- cache hits: {inf['cache_hits']}{rate}, of which from disk: {inf['disk_hits']}",
        f"- workers: {inf['workers']}, OOM retries: {inf['oom_retries']}, "
        f"restarts: {inf['restarts']}",
    ]
    if p95 is not None:
        lines.append(f"- p95 latency of a forward pass: {p95:.0f} ms")
    return "\n".join(lines)


def _stages_section(summary: dict[str, Any]) -> str:
    lines = ["## Wall time by stage", "", "| stage | seconds |", "|---|---:|"]
    for stage, seconds in summary["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    if "wall_seconds" in summary:
        lines.append(f"| total (before the report) | {summary['wall_seconds']:.1f} |")
    return "\n".join(lines)


PLOT_TITLES = {
    "metrics.png": "Dice and Recall per method, with 95% CIs and the 0.85 goal",
    "learning_curves.png": "Learning curves per experiment (Tune results)",
    "reward_net_dice.png": "Reward net: predicted vs true Dice (validation)",
    "examples.png": "Examples: worst, median and best baseline image",
}


def _plots_section(plots: Mapping[str, str | None]) -> str:
    lines = ["## Plots", ""]
    for name, title in PLOT_TITLES.items():
        why = plots.get(name)
        if why is None:
            lines += [f"### {title}", "", f"![{title}](plots/{name})", ""]
        else:
            lines += [f"### {title}", "", f"Not drawn: {why}.", ""]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------------------
@contextmanager
def _figure(name: str, out: Path, **subplots: Any) -> Iterator[tuple[Figure, Any]]:
    """A figure of the size fixed for ``name``, saved to ``out/name`` with no metadata that
    changes between runs (so a rebuild is byte-identical)."""
    import matplotlib.style
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=PLOT_SIZES[name], dpi=PLOT_DPI, layout="constrained")
        axes = fig.subplots(**subplots)
        yield fig, axes
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{name}.tmp"
        fig.savefig(tmp, format="png", dpi=PLOT_DPI, metadata={"Software": None})
        os.replace(tmp, out / name)


def write_plots(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> dict[str, str | None]:
    """Draw every plot into ``plots/``; returns file name -> None (drawn) or why it is not.
    A plot that cannot be drawn is removed, so no stale file outlives a rebuild."""
    out = record.paths.plots
    drawers: dict[str, Callable[[], str | None]] = {
        "metrics.png": lambda: plot_metrics(summaries, out),
        "learning_curves.png": lambda: plot_learning_curves(record.trials, out),
        "reward_net_dice.png": lambda: plot_reward_net(record.predictions, out),
        "examples.png": lambda: plot_examples(record, summaries, out),
    }
    status = {}
    for name, draw in drawers.items():
        status[name] = draw()
        if status[name] is not None:
            (out / name).unlink(missing_ok=True)
    return status


def plot_metrics(summaries: Mapping[str, MethodSummary], out: Path) -> str | None:
    """Bars of mean Dice and Recall per method with 95% CI error bars and the goal line."""
    ordered = _ordered(summaries)
    if not ordered:
        return "no evaluated methods"
    names = [s.method for s in ordered]
    with _figure("metrics.png", out, nrows=1, ncols=2, sharey=True) as (fig, axes):
        for ax, metric in zip(axes, ("dice", "recall"), strict=True):
            est = [s.metrics[metric] for s in ordered]
            means = np.array([e.mean for e in est])
            err = np.array([[e.mean - e.low for e in est], [e.high - e.mean for e in est]])
            colours = [_method_colour(n) for n in names]
            ax.bar(range(len(names)), means, yerr=err, capsize=4, color=colours, edgecolor="k")
            ax.axhline(TARGET[metric], color="crimson", ls="--", lw=1.5, label="goal 0.85")
            for i, m in enumerate(means):
                ax.text(i, 0.02, f"{m:.3f}", ha="center", va="bottom", fontsize=8, rotation=90)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=9)
            ax.set_ylim(0, 1)
            ax.set_title(f"{metric.capitalize()} (mean, 95% CI)")
            ax.set_ylabel(metric.capitalize())
            ax.grid(axis="y", alpha=0.3)
            ax.legend(loc="upper left", fontsize=8)
        fig.suptitle("Test-split results per method (same images for every method)")
    return None


def _method_colour(method: str) -> str:
    if method.startswith("oracle"):
        return "#bbbbbb"
    if method in ("baseline", "best_fixed_prompt"):
        return "#8fb3d9"
    return "#f4a259"


def plot_learning_curves(trials: Sequence[TuneTrial], out: Path) -> str | None:
    """Per PPO experiment: ``rollout/ep_rew_mean`` and the episodes' final GT Dice (and the
    reward net's score for the reward-guided one) against env steps."""
    by_name = {t.name: t for t in trials}
    if not any(n in by_name for n in PPO_TRIALS):
        return "no PPO trial in the Tune experiment"
    with _figure("learning_curves.png", out, nrows=len(PPO_TRIALS), ncols=2) as (fig, axes):
        for row, name in enumerate(PPO_TRIALS):
            trial = by_name.get(name)
            left, right = axes[row]
            _curve(left, trial, [(mk.EP_REW_MEAN, mk.EP_REW_MEAN, "tab:blue")])
            left.set_ylabel("episode return (mean)")
            left.set_title(f"{name}: {mk.EP_REW_MEAN}")
            series = [(mk.GT_DICE, f"ground-truth Dice ({mk.GT_DICE})", "tab:green")]
            if name == "reward_guided":
                label = f"reward-net score ({mk.REWARD_NET_SCORE})"
                series.append((mk.REWARD_NET_SCORE, label, "tab:purple"))
            _curve(right, trial, series)
            right.set_ylabel("score of the episode's final mask")
            right.set_title(f"{name}: final-mask quality")
            for ax in (left, right):
                ax.set_xlabel("env steps (" + mk.ENV_STEPS + ")")
                ax.grid(alpha=0.3)
        fig.suptitle("Learning curves (100-episode means, per training iteration)")
    return None


def _curve(ax: Axes, trial: TuneTrial | None, series: Sequence[tuple[str, str, str]]) -> None:
    if trial is None or mk.ENV_STEPS not in trial.results:
        note = "trial not in this run" if trial is None else f"no results ({trial.status})"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        return
    drawn = False
    for key, label, colour in series:
        if key not in trial.results:
            continue
        frame = trial.results[[mk.ENV_STEPS, key]].dropna()
        ax.plot(frame[mk.ENV_STEPS], frame[key], marker="o", ms=3, color=colour, label=label)
        drawn = True
    if drawn:
        ax.legend(fontsize=8)


def plot_reward_net(predictions: RewardNetPredictions | None, out: Path) -> str | None:
    """Predicted vs true Dice of the reward net's validation examples, with y = x."""
    if predictions is None or not predictions.image_ids:
        return "no reward-net validation predictions in this run"
    d = TARGETS.index("dice")
    pred, true = predictions.predicted[:, d], predictions.true[:, d]
    mae = float(np.mean(np.abs(pred - true)))
    with _figure("reward_net_dice.png", out) as (_fig, ax):
        ax.scatter(true, pred, s=18, alpha=0.7, color="tab:purple", label="validation example")
        ax.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="perfect prediction (y = x)")
        ax.axhline(float(np.mean(pred)), color="grey", ls=":", lw=1, label="mean prediction")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("true Dice (against ground truth)")
        ax.set_ylabel("predicted Dice (reward net)")
        ax.set_title(f"Reward net on {len(true)} validation masks, MAE {mae:.3f}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return None


# Overlay colours (RGB): agreement, false alarm, miss.
TP_COLOUR, FP_COLOUR, FN_COLOUR = (0.1, 0.8, 0.1), (0.95, 0.1, 0.1), (0.15, 0.45, 1.0)


def plot_examples(
    record: RunRecord, summaries: Mapping[str, MethodSummary], out: Path
) -> str | None:
    """Image, ground truth, baseline and the best non-oracle method on the worst, median and
    best baseline image, from the saved example masks and the dataset."""
    base = [r for r in record.rows if r.method == "baseline"]
    if not base:
        return "no baseline results"
    best = best_method(summaries)
    picks = pick_examples(base)
    directory = record.paths.eval_dir / EXAMPLES_DIR
    needed = [
        example_mask_path(directory, m, i) for i in picks.values() for m in ("baseline", best)
    ]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        return f"example mask {_relative(missing[0], record.paths.root)} is missing"
    samples = _load_examples(record, sorted(set(picks.values())))
    dice = {(r.method, r.image_id): r.dice for r in record.rows}
    with _figure("examples.png", out, nrows=len(EXAMPLE_ROLES), ncols=4) as (fig, axes):
        for row, role in enumerate(EXAMPLE_ROLES):
            image_id = picks[role]
            image, gt = samples[image_id]
            grey = image.mean(axis=2) / 255.0
            panels = [
                (np.stack([grey] * 3, axis=-1), f"{role} baseline image"),
                (_overlay(grey, gt, gt), "ground truth"),
            ]
            for method in ("baseline", best):
                mask = read_mask_png(example_mask_path(directory, method, image_id))
                title = f"{method}: Dice {dice[(method, image_id)]:.3f}"
                panels.append((_overlay(grey, mask, gt), title))
            for ax, (pixels, title) in zip(axes[row], panels, strict=True):
                ax.imshow(pixels, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[row][0].set_ylabel(_short(image_id), fontsize=7)
        _overlay_legend(fig)
        fig.suptitle(f"Baseline vs the best non-oracle method ({best}) on three test images")
    return None


def _load_examples(record: RunRecord, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, Any]]:
    from envs.datasets import DEFAULT_GROUP_PATTERN, load_dataset

    data = record.config.data
    root = record.paths.synthetic_data if data.path is None else Path(data.path).expanduser()
    if not root.exists():
        raise UserError(
            f"the run's dataset {root} is gone; the report's example overlays need its images: "
            "restore it (or rebuild the report where it exists)"
        )
    pattern = DEFAULT_GROUP_PATTERN if data.group_pattern == "default" else data.group_pattern
    dataset = load_dataset(root, fmt=data.format, group_pattern=pattern, skip_bad=data.skip_bad)
    samples = {}
    for image_id in ids:
        sample = dataset.load(image_id)
        samples[image_id] = (sample.image, sample.mask)
    return samples


def _overlay(grey: np.ndarray, mask: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The grey image with agreement in green, false alarms in red and misses in blue."""
    rgb = np.stack([grey] * 3, axis=-1) * 0.6
    for region, colour in (
        (mask & gt, TP_COLOUR),
        (mask & ~gt, FP_COLOUR),
        (~mask & gt, FN_COLOUR),
    ):
        rgb[region] = colour
    return rgb


def _overlay_legend(fig: Figure) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(color=TP_COLOUR, label="vessel found (true positive)"),
        Patch(color=FP_COLOUR, label="false alarm (false positive)"),
        Patch(color=FN_COLOUR, label="missed vessel (false negative)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)


def _short(image_id: str, limit: int = 40) -> str:
    return image_id if len(image_id) <= limit else "..." + image_id[-(limit - 3) :]
