"""``summary.json`` and the rebuild of every report file from a run's files.

:func:`build_summary` collects the run facts when the run finishes; :func:`write_report` (needs
no model and no Ray) rebuilds ``summary.json``'s ``methods``, ``report.md`` and ``plots/*.png``
from files only: the per-image CSV, the example masks and the dataset images, the reward net's
``report.json`` and ``val_predictions.csv``, the Tune experiment and the run facts already in
``summary.json``. The run calls it, and so does ``sa2va-rl report RUN_DIR``; being a pure
function of those files, it rebuilds every report file byte for byte. Nothing in the report
names the run directory's absolute path, so a moved run still rebuilds to the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import run_dir
from orchestrator.config import RunConfig
from orchestrator.evaluation.methods import METHODS
from orchestrator.evaluation.statistics import Estimate, MethodSummary, summarise
from orchestrator.experiments import TrialOutcome
from orchestrator.report.learning import learning_json
from orchestrator.report.markdown import render_report
from orchestrator.report.plots import write_plots
from orchestrator.report.record import load_run
from orchestrator.run_dir import RunPaths

if TYPE_CHECKING:
    from orchestrator.data import PreparedData


def build_summary(
    config: RunConfig,
    prepared: PreparedData,
    outcomes: Iterable[TrialOutcome],
    inference: dict[str, Any],
    stage_seconds: dict[str, float],
    started: float,
    backend_id: str | None = None,
) -> dict[str, Any]:
    """The run facts of ``summary.json``; ``methods`` stays empty until :func:`write_report`
    fills it from the per-image CSV."""
    total = inference["total"]
    trials = {outcome.name: outcome.status for outcome in outcomes}
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
            "corrupt_entries": total["corrupt_entries"],
            "disk_read_errors": total["disk_read_errors"],
            "disk_write_errors": total["disk_write_errors"],
            "latency_ms_p95": total.get("latency_ms_p95_worst"),
        },
        "stage_seconds": stage_seconds,
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def _estimate_json(e: Estimate, image_level: Estimate | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": round(e.mean, 6), "ci95": _ci_json(e)}
    if image_level is not None:
        out["ci95_image_level"] = _ci_json(image_level)
    return out


def _ci_json(e: Estimate) -> list[float]:
    return [round(e.low, 6), round(e.high, 6)]


def methods_json(
    summaries: Mapping[str, MethodSummary], val: Mapping[str, MethodSummary] | None = None
) -> dict[str, Any]:
    """``summary.json``'s ``methods``: per method the test split's means over seeds with the
    video-level 95% CIs (``ci95``, what verdicts use) and the image-level ones
    (``ci95_image_level``), the numbers of images, videos and seeds, each seed's means
    (``per_seed``), the paired differences to each reference (``vs_<reference>``) and the val
    split's means with video-level CIs (``val``, when evaluated there)."""
    out = {}
    for method in [m for m in METHODS if m in summaries]:
        s = summaries[method]
        entry: dict[str, Any] = {
            "n": s.n,
            "videos": s.videos,
            "seeds": s.seeds,
            **{name: round(e.mean, 6) for name, e in s.metrics.items()},
            "ci95": {name: _ci_json(e) for name, e in s.metrics.items()},
            "ci95_image_level": {name: _ci_json(e) for name, e in s.image_metrics.items()},
            "per_seed": {
                str(seed): {name: round(v, 6) for name, v in means.items()}
                for seed, means in (s.per_seed or {}).items()
            },
        }
        for reference, diffs in s.paired.items():
            image = s.image_paired.get(reference, {})
            entry[f"vs_{reference}"] = {
                name: _estimate_json(e, image.get(name)) for name, e in diffs.items()
            }
        if val is not None and method in val:
            entry["val"] = {name: _estimate_json(e) for name, e in val[method].metrics.items()}
        out[method] = entry
    return out


def write_report(paths: RunPaths) -> dict[str, Any]:
    """Rebuild ``summary.json`` (its ``methods``), ``report.md`` and ``plots/*.png`` from the
    run's files; returns the summary. Byte-identical for identical inputs."""
    record = load_run(paths.root)
    summaries = summarise(record.rows, groups=record.groups)
    val = summarise(record.val_rows, groups=record.groups)
    summary = {
        **record.facts,
        "methods": methods_json(summaries, val),
        "learning": learning_json(record.config, summaries, record.train_rows, record.rows),
    }
    run_dir.write_json(record.paths.summary, summary)
    plots = write_plots(record, summaries)
    report = render_report(record, summary, summaries, plots, val)
    run_dir.write_text(record.paths.report, report)
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
