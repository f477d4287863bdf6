"""The report's learning diagnostics: does RL beat the learners a reviewer compares it with, and
when it does not learn, why (settings, train vs test Dice, what each policy chooses).

Everything here is a pure function of the run's files (the per-image CSVs of the test and the
training images and the resolved config), so ``sa2va-rl report`` rebuilds it byte for byte.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from envs.mask_ops import MaskOpsConfig
from orchestrator.config import RunConfig
from orchestrator.evaluation.methods import METHODS, OPS_BASELINES, PROMPT_BASELINES
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.evaluation.statistics import MethodSummary, verdict
from orchestrator.experiments import PPO_TRIALS, RL_METHODS

COMPARATORS = ("baseline", *PROMPT_BASELINES, *OPS_BASELINES)
"""What every RL method is compared with, in table order."""
TOP_ACTIONS = 6
"""Actions (or action sequences) shown per policy in the histograms; the rest are summed."""


def _fmt(diff: Any) -> str:
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {_short(verdict(diff))}"


def _short(word: str) -> str:
    return {"no significant difference": "n.s."}.get(word, word)


def settings(config: RunConfig) -> dict[str, Any]:
    """The learning-relevant settings: normalisation, episode shape, post-processing actions."""
    ops = MaskOpsConfig.from_dict(dict(config.mask_ops))
    return {
        "normalize_observations": config.ppo.normalize_observations,
        "episode_steps": {t.name: config.env.steps_for(t.experiment) for t in PPO_TRIALS},
        "action_set": ops.set_name,
        "ops": list(ops.ops),
    }


def histogram(rows: Sequence[ImageResult], method: str) -> list[tuple[str, int]]:
    """(action sequence, images) of ``method`` over ``rows``, most frequent first (ties by
    name); ``detail`` holds the actions joined by " > "."""
    counts = Counter(r.detail for r in rows if r.method == method)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def mean_dice(rows: Sequence[ImageResult]) -> dict[str, float]:
    """Method -> mean Dice over ``rows``, in report order."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r.method, []).append(r.dice)
    return {m: float(np.mean(by[m])) for m in METHODS if m in by}


def learning_json(
    config: RunConfig,
    summaries: Mapping[str, MethodSummary],
    train_rows: Sequence[ImageResult],
    test_rows: Sequence[ImageResult],
) -> dict[str, Any]:
    """``summary.json``'s ``learning``: settings, gap shares, train Dice, action histograms."""
    train = mean_dice(train_rows)
    learned = [m for m in METHODS if m in train and m != "baseline"]
    return {
        **settings(config),
        "gap_closed": gap_closed(summaries),
        "train_dice": {m: round(train[m], 6) for m in learned},
        "action_histograms": {
            m: {
                split: dict(histogram(rows, m))
                for split, rows in (("train", train_rows), ("test", test_rows))
            }
            for m in (*RL_METHODS, *PROMPT_BASELINES[1:], *OPS_BASELINES)
            if m in summaries
        },
    }


def _oracle_of(method: str) -> str:
    ops_methods = ("postprocess_rl", "combined", *OPS_BASELINES)
    return "oracle_postprocess" if method in ops_methods else "oracle_prompt"


def gap_closed(summaries: Mapping[str, MethodSummary]) -> dict[str, float]:
    """Method -> share of the baseline -> oracle Dice gap it closes (its own family's oracle:
    post-processing methods against ``oracle_postprocess``, prompt methods ``oracle_prompt``)."""
    if "baseline" not in summaries:
        return {}
    base = summaries["baseline"].metrics["dice"].mean
    out = {}
    for method in METHODS:
        oracle = _oracle_of(method)
        if method == "baseline" or method.startswith("oracle") or method not in summaries:
            continue
        if oracle not in summaries:
            continue
        gap = summaries[oracle].metrics["dice"].mean - base
        if gap > 1e-9:
            out[method] = round((summaries[method].metrics["dice"].mean - base) / gap, 4)
    return out


def render(
    config: RunConfig,
    summaries: Mapping[str, MethodSummary],
    train_rows: Sequence[ImageResult],
    test_rows: Sequence[ImageResult],
) -> str:
    """The ``RL vs the baselines`` and ``Learning diagnostics`` sections of ``report.md``."""
    return "\n\n".join(
        [
            _vs_learners(summaries),
            _diagnostics(config, summaries, train_rows, test_rows),
        ]
    )


def _vs_learners(summaries: Mapping[str, MethodSummary]) -> str:
    present = [c for c in COMPARATORS if c in summaries]
    lines = [
        "## RL vs the baselines",
        "",
        "Paired Dice difference (RL method minus the column's method, per test image) with its "
        "95% CI: *better* / *worse* when the CI excludes 0, else *n.s.* The learners see the "
        "same observation as the policies and are fitted on the same training images: "
        "`bandit_prompt` (LinUCB, as many interactions as PPO has env steps), "
        "`supervised_prompt` (ridge: observation -> each prompt's Dice, argmax), "
        "`supervised_ops` (the same over every op sequence up to the episode length), "
        "`best_fixed_ops` (the one op sequence best on the training images). Gap: share of the "
        "baseline -> oracle Dice gap closed (`oracle_postprocess` for post-processing methods, "
        "`oracle_prompt` otherwise).",
        "",
    ]
    rl = [m for m in RL_METHODS if m in summaries]
    if not rl or not present:
        return "\n".join([*lines, "No RL method or no baseline was evaluated."])
    shares = gap_closed(summaries)
    lines += [
        "| method | gap | " + " | ".join(f"vs {c}" for c in present) + " |",
        "|---|---:|" + "---|" * len(present),
    ]
    for m in rl:
        paired = summaries[m].paired
        cells = [_fmt(paired[c]["dice"]) if c in paired else "n/a" for c in present]
        gap = f"{100 * shares[m]:.0f}%" if m in shares else "n/a"
        lines.append(f"| {m} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diagnostics(
    config: RunConfig,
    summaries: Mapping[str, MethodSummary],
    train_rows: Sequence[ImageResult],
    test_rows: Sequence[ImageResult],
) -> str:
    s = settings(config)
    steps = ", ".join(f"{name} {n}" for name, n in s["episode_steps"].items())
    lines = [
        "## Learning diagnostics",
        "",
        f"- Observation normalisation: {'on' if s['normalize_observations'] else 'off'} "
        "(`ppo.normalize_observations`; fixed mean/std of random-policy observations on the "
        "training images, saved with each policy).",
        f"- Steps per episode: {steps} (`env.episode_steps`, else `env.max_steps`).",
        f"- Post-processing action set: {s['action_set']} ({', '.join(s['ops'])}).",
        "",
    ]
    train, test = mean_dice(train_rows), mean_dice(test_rows)
    both = [m for m in test if m in train and not m.startswith("oracle")]
    if both:
        lines += [
            "Train vs test Dice (a large gap is over-fitting to the training images):",
            "",
            "| method | train Dice | test Dice | train - test |",
            "|---|---:|---:|---:|",
        ]
        for m in both:
            lines.append(f"| {m} | {train[m]:.3f} | {test[m]:.3f} | {train[m] - test[m]:+.3f} |")
        lines.append("")
    lines += [
        "What each policy chooses (images per action, or per action sequence; a policy that "
        "picks one action everywhere ignores the image):",
        "",
    ]
    shown = [m for m in RL_METHODS if m in summaries]
    if not shown:
        lines.append("No RL method was evaluated.")
    for m in shown:
        lines += _histogram_table(m, histogram(train_rows, m), histogram(test_rows, m))
    return "\n".join(lines)


def _histogram_table(
    method: str, train: list[tuple[str, int]], test: list[tuple[str, int]]
) -> list[str]:
    train_counts, test_counts = dict(train), dict(test)
    order = [a for a, _ in test] + [a for a, _ in train if a not in test_counts]
    top, rest = order[:TOP_ACTIONS], order[TOP_ACTIONS:]
    lines = [
        f"**{method}**: {len(test_counts)} distinct on test, {len(train_counts)} on train",
        "",
        "| actions | train images | test images |",
        "|---|---:|---:|",
    ]
    for action in top:
        lines.append(
            f"| {action or '(none)'} | {train_counts.get(action, 0)} | "
            f"{test_counts.get(action, 0)} |"
        )
    if rest:
        lines.append(
            f"| ({len(rest)} others) | {sum(train_counts.get(a, 0) for a in rest)} | "
            f"{sum(test_counts.get(a, 0) for a in rest)} |"
        )
    return [*lines, ""]
