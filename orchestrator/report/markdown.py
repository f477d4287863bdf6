"""The text of ``report.md``: which experiment improves Dice and Recall, and is it real."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from orchestrator import metric_keys as mk
from orchestrator.evaluation.statistics import (
    MIN_TEST_VIDEOS,
    MethodSummary,
    best_method,
    ordered,
    verdict,
)
from orchestrator.experiments import RL_METHODS
from orchestrator.report import finetune, learning
from orchestrator.report.record import RunRecord
from orchestrator.report.verdicts import (
    ceilings,
    fmt_ci,
    fmt_range,
    goal,
    verdicts,
)


def render_report(
    record: RunRecord,
    summary: dict[str, Any],
    summaries: Mapping[str, MethodSummary],
    plots: Mapping[str, str | None],
    val: Mapping[str, MethodSummary] | None = None,
) -> str:
    """The text of ``report.md`` (``val``: the methods' summaries on the val split)."""
    sections = [
        _header(record, summary, summaries),
        _in_short(summaries),
        _results_table(summaries, val or {}),
        verdicts(record, summaries),
        goal(summaries),
        ceilings(summaries),
        learning.render(record.config, summaries, record.train_rows, record.rows),
        finetune.render(record, summaries),
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
        "resamples) that resample whole test **videos** (frames of one video are "
        "near-duplicates) and, for trained policies, training seeds too; the image-level CI "
        "(frames as if independent) is shown beside it, labelled; differences are paired (same "
        "images); verdicts use the video-level CI"
    )
    lines += _uncertainty_lines(record.config.ppo.seeds, summaries)
    return "\n".join(lines)


def _uncertainty_lines(seeds: int, summaries: Mapping[str, MethodSummary]) -> list[str]:
    """How many test videos and training seeds the CIs rest on, with the warnings."""
    videos = max((s.videos for s in summaries.values()), default=0)
    lines = [f"- **Test videos**: {videos}; **training seeds** per RL method: {seeds}"]
    if videos < MIN_TEST_VIDEOS:
        lines.append(
            f"- **Warning: only {videos} test video(s)** (fewer than {MIN_TEST_VIDEOS}): a "
            "bootstrap over so few videos under-covers, so even the video-level CIs are too "
            "narrow; treat every verdict as indicative and add test videos"
        )
    if seeds == 1:
        lines.append(
            "- **One training seed**: the CIs cover the test videos, not the run-to-run "
            "variation of training (seeds 0-2 moved prompt_rl's Dice by ~0.006 before); set "
            "`ppo.seeds` (full mode: 5) for CIs that resample seeds"
        )
    return lines


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


def _results_table(summaries: Mapping[str, MethodSummary], val: Mapping[str, MethodSummary]) -> str:
    lines = [
        "## Results on the test split",
        "",
        "Mean over seeds [video-level 95% CI] per method on the test split; the Dice "
        "image-level CI beside it; the val split's Dice and Recall [video-level CI] last "
        "(no method was selected on test; the oracles run on test only).",
        "",
        "| method | n | videos | seeds | Dice | Dice, image-level CI | Recall | Precision | IoU "
        "| val Dice | val Recall |",
        "|---|---:|---:|---:|---|---|---|---|---|---|---|",
    ]
    for s in ordered(summaries):
        m = s.metrics
        v = val.get(s.method)
        cells = [fmt_ci(v.metrics["dice"]), fmt_ci(v.metrics["recall"])] if v else ["—", "—"]
        lines.append(
            f"| {s.method} | {s.n} | {s.videos} | {s.seeds} | {fmt_ci(m['dice'])} | "
            f"{fmt_range(s.image_metrics['dice'])} | {fmt_ci(m['recall'])} | "
            f"{fmt_ci(m['precision'])} | {fmt_ci(m['iou'])} | {cells[0]} | {cells[1]} |"
        )
    lines += _per_seed_table(summaries)
    return "\n".join(lines)


def _per_seed_table(summaries: Mapping[str, MethodSummary]) -> list[str]:
    seeded = [s for s in ordered(summaries) if s.seeds > 1]
    if not seeded:
        return []
    seeds = sorted({k for s in seeded for k in s.per_seed or {}})
    return [
        "",
        "Test Dice per training seed (`summary.json`: `per_seed`):",
        "",
        "| method | " + " | ".join(f"seed {k}" for k in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
        *(
            f"| {s.method} | "
            + " | ".join(
                f"{s.per_seed[k]['dice']:.3f}" if s.per_seed and k in s.per_seed else "—"
                for k in seeds
            )
            + " |"
            for s in seeded
        ),
    ]


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
    "reward_hacking.png": "Fine-tuning: reward-net score vs ground-truth Dice along training",
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
