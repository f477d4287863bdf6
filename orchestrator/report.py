"""Evaluation of a finished run, ``summary.json``, ``report.md`` and the plots.

The report is a pure function of files in the run directory (``eval/per_image.csv``, example
masks, the reward net's validation predictions, the Tune experiment and the run facts in
``summary.json``), so ``sa2va-rl report RUN_DIR`` rebuilds it byte for byte without running a
model.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from envs.sources import load_samples
from models.errors import UserError
from orchestrator import metric_keys as mk
from orchestrator.config import RunConfig, parse_config
from orchestrator.evaluation import (
    METHOD_OF_TRIAL,
    METHODS,
    ImageResult,
    MethodSummary,
    best_fixed_prompt,
    make_evaluator,
    summarise,
)
from orchestrator.experiments import RunPaths, env_kwargs, make_env

PER_IMAGE_CSV = "per_image.csv"
EXAMPLES_DIR = "examples"
N_EXAMPLES = 3
TARGET = {"dice": 0.85, "recall": 0.85}
"""The users' goal (SEEDS.md): Dice and Recall of at least 0.85."""


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
    """Every method on the test split; writes ``eval/per_image.csv`` and example masks."""
    from orchestrator.ppo import ExportedPolicy

    data = {"data": prepared.data_dir, "manifest": paths.manifest}
    test = load_samples(**data, split="test", max_images=config.data.max_eval_images)
    train = load_samples(**data, split="train", max_images=config.data.max_train_images)
    evaluator = make_evaluator(config, test, segmenter)
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
    steps: list[tuple[str, Any]] = [
        ("baseline", evaluator.baseline),
        ("best_fixed_prompt", lambda: evaluator.fixed_prompt("best_fixed_prompt", fixed)),
    ]
    for trial, policy in policies.items():
        method = METHOD_OF_TRIAL[trial]
        steps.append((method, lambda e=envs[trial], p=policy, m=method: evaluator.policy(m, e, p)))
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
    _save_examples(paths, test, rows, segmenter, config)
    return rows


def write_rows(path: Path, rows: Sequence[ImageResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [f.name for f in fields(ImageResult)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in asdict(row).items()})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)


def read_rows(path: Path) -> list[ImageResult]:
    if not path.is_file():
        raise UserError(
            f"{path} is missing: the run's evaluation did not finish; re-run it with --resume"
        )
    with path.open() as handle:
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


def _save_examples(
    paths: RunPaths,
    test: Sequence[Any],
    rows: Sequence[ImageResult],
    segmenter: Any,
    config: RunConfig,
) -> None:
    """Masks of baseline and the best non-oracle method on three images (worst, median, best
    baseline Dice), as PNGs, so the report can draw overlays without a model."""
    import cv2

    from envs.mask_ops import MaskOpsConfig, MaskState, apply_op

    summaries = summarise(rows)
    best = _best_method(summaries)
    base = sorted((r for r in rows if r.method == "baseline"), key=lambda r: (r.dice, r.image_id))
    picks = {base[0].image_id, base[len(base) // 2].image_id, base[-1].image_id}
    by_id = {s.id: s for s in test}
    ops = MaskOpsConfig.from_dict(dict(config.mask_ops))
    out = paths.eval_dir / EXAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.image_id not in picks or row.method not in ("baseline", best):
            continue
        sample = by_id[row.image_id]
        mask = _replay(row, sample, segmenter, config, ops, MaskState, apply_op)
        name = f"{row.method}__{Path(row.image_id).stem}.png"
        cv2.imwrite(str(out / name), mask.astype(np.uint8) * 255)


def _replay(
    row: ImageResult,
    sample: Any,
    segmenter: Any,
    config: RunConfig,
    ops: Any,
    state_cls: Any,
    apply_op: Any,
) -> np.ndarray:
    """Rebuild a method's final mask from its recorded actions (prompts and ops)."""
    steps = [s for s in row.detail.split(" > ") if s and s != "(none)"]
    prompts = set(config.env.prompts)
    prompt = config.env.default_prompt
    for step in steps:
        if step in prompts:
            prompt = step
    state = state_cls.from_segmentation(segmenter.segment(sample.image, prompt))
    for step in steps:
        if step not in prompts and step != "stop":
            state = apply_op(step, state, ops)
    return state.mask


def _best_method(summaries: dict[str, MethodSummary]) -> str:
    candidates = [m for m in summaries if not m.startswith("oracle") and m != "baseline"]
    if not candidates:
        return "baseline"
    return max(candidates, key=lambda m: (summaries[m].metrics["dice"].mean, m))


# --- summary.json --------------------------------------------------------------------------------
def build_summary(
    config: RunConfig,
    prepared: Any,
    grid: Any,
    rows: Sequence[ImageResult],
    inference: dict[str, Any],
    stage_seconds: dict[str, float],
    started: float,
) -> dict[str, Any]:
    total = inference["total"]
    trials = {str(r.config["trial"]): _status(r) for r in grid}
    return {
        "mode": config.mode,
        "backend": config.backend.name,
        "backend_id": inference.get("backend_id"),
        "splits": prepared.split_sizes,
        "trials": trials,
        "methods": methods_json(summarise(rows)),
        "inference": {
            "forward_passes": total["forward_passes"],
            "distinct_pairs": total["forward_passes"] + total["disk_hits"],
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


def methods_json(summaries: dict[str, MethodSummary]) -> dict[str, Any]:
    out = {}
    for method in [m for m in METHODS if m in summaries]:
        s = summaries[method]
        out[method] = {
            "n": s.n,
            **{name: round(e.mean, 6) for name, e in s.metrics.items()},
            "ci95": {name: [round(e.low, 6), round(e.high, 6)] for name, e in s.metrics.items()},
            "vs_baseline": {
                name: {"mean": round(e.mean, 6), "ci95": [round(e.low, 6), round(e.high, 6)]}
                for name, e in s.vs_baseline.items()
            },
        }
    return out


# --- report.md and plots -------------------------------------------------------------------------
def comparison_table(summary: dict[str, Any]) -> str:
    """The final table printed at the end of a run (and at the top of report.md)."""
    lines = [
        f"{'method':20s} {'n':>4s} {'Dice':>7s} {'Recall':>7s} {'Precision':>9s} {'IoU':>7s}   "
        "Dice vs baseline [95% CI]"
    ]
    for method, m in summary["methods"].items():
        diff = m["vs_baseline"].get("dice")
        verdict = ""
        if diff and method != "baseline":
            verdict = f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        lines.append(
            f"{method:20s} {m['n']:4d} {m['dice']:7.3f} {m['recall']:7.3f} "
            f"{m['precision']:9.3f} {m['iou']:7.3f}   {verdict}"
        )
    return "\n".join(lines)


def write_report(paths: RunPaths, summary: dict[str, Any]) -> None:
    """report.md from summary.json (methods already computed)."""
    text = [f"# sa2va-rl run: {summary['mode']} ({summary['backend']})", ""]
    text += ["```", comparison_table(summary), "```", ""]
    paths.report.write_text("\n".join(text))


def read_summary(paths: RunPaths) -> dict[str, Any]:
    if not paths.summary.is_file():
        raise UserError(f"{paths.summary} is missing: {paths.root} is not a finished run")
    return json.loads(paths.summary.read_text())


def load_run_config(paths: RunPaths) -> RunConfig:
    import yaml

    return parse_config(yaml.safe_load(paths.config.read_text()), source=str(paths.config))


__all__ = ["TARGET", "comparison_table", "evaluate_run", "mk"]
