"""The report's verdicts: is each method's difference to the baseline and to the best fixed
choice real (video-level CIs), did any verdict change against the image-level CI, how far each
method is from the users' goal (:data:`TARGET`) and from the oracle ceilings. Also the number
formats every report section uses for an estimate and its CI.
"""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.evaluation.methods import BASELINE_METHODS, METHODS
from orchestrator.evaluation.statistics import (
    UNDETERMINED,
    Estimate,
    MethodSummary,
    ordered,
    verdict,
)
from orchestrator.experiments import PPO_TRIALS, RL_METHODS
from orchestrator.report.record import RunRecord

TARGET = {"dice": 0.85, "recall": 0.85}
"""The users' goal (SEEDS.md): Dice and Recall of at least 0.85."""


def fmt_ci(e: Estimate) -> str:
    return f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"


def fmt_diff(e: Estimate) -> str:
    return f"{e.mean:+.3f} [{e.low:.3f}, {e.high:.3f}]"


def fmt_range(e: Estimate) -> str:
    return f"[{e.low:.3f}, {e.high:.3f}]"


def verdicts(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> str:
    lines = [
        "## Verdicts",
        "",
        "Paired difference to the baseline (method minus baseline, per image) with its "
        "video-level 95% CI; a difference is significant when its CI excludes 0. In brackets: "
        "the image-level CI and its verdict where it differs.",
        "",
    ]
    for s in ordered(summaries):
        if s.method == "baseline" or "baseline" not in s.paired:
            continue
        dice, recall = s.paired["baseline"]["dice"], s.paired["baseline"]["recall"]
        lines.append(
            f"- {s.method}: {fmt_diff(dice)} Dice vs baseline — {verdict(dice)}"
            f"{_image_note(s, 'baseline', 'dice')}; "
            f"Recall {fmt_diff(recall)} — {verdict(recall)}{_image_note(s, 'baseline', 'recall')}"
        )
    lines += _missing_methods(record, summaries)
    lines += ["", *_changed_verdicts(summaries)]
    lines += ["", "**Does RL beat the best fixed prompt?**", ""]
    lines += _vs_best_fixed(summaries)
    return "\n".join(lines)


def _image_note(s: MethodSummary, reference: str, metric: str) -> str:
    image = s.image_paired.get(reference, {}).get(metric)
    if image is None:
        return ""
    video = s.paired[reference][metric]
    changed = "" if verdict(image) == verdict(video) else f", {verdict(image)}"
    return f" (image-level {fmt_range(image)}{changed})"


def _changed_verdicts(summaries: Mapping[str, MethodSummary]) -> list[str]:
    """The verdicts (vs every reference, Dice and Recall) that the image-level CI would give
    differently: what treating frames as independent would have claimed."""
    changed = []
    for s in ordered(summaries):
        for reference, diffs in s.paired.items():
            for metric in ("dice", "recall"):
                image = s.image_paired.get(reference, {}).get(metric)
                if image is None or METHODS.index(reference) >= METHODS.index(s.method):
                    continue  # each pair once: the later method against the earlier one
                before, after = verdict(image), verdict(diffs[metric])
                if before != after:
                    changed.append(
                        f"  - {s.method} vs {reference}, {metric}: image-level {before} -> "
                        f"video-level {after}"
                    )
    if not changed:
        return ["**Verdicts changed by resampling videos instead of images**: none."]
    return ["**Verdicts changed by resampling videos instead of images**:", *changed]


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
            UNDETERMINED: "cannot be compared with it on one test video",
        }[verdict(dice)]
        lines.append(f"- {method} {outcome}: {fmt_diff(dice)} Dice vs best_fixed_prompt.")
    return lines or ["- no RL method was evaluated."]


def goal(summaries: Mapping[str, MethodSummary]) -> str:
    goal = " and ".join(f"{name.capitalize()} >= {value}" for name, value in TARGET.items())
    reached = [
        s.method
        for s in ordered(summaries)
        if all(s.metrics[name].mean >= value for name, value in TARGET.items())
    ]
    real = [m for m in reached if not m.startswith("oracle")]
    lines = [f"## Goal: {goal}", ""]
    if real:
        lines.append(f"Reached (mean over the test images) by: {', '.join(real)}.")
    else:
        lines.append("No non-oracle method reaches the goal (mean over the test images).")
    candidates = [s for s in ordered(summaries) if not s.method.startswith("oracle")]
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


def ceilings(summaries: Mapping[str, MethodSummary]) -> str:
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
        lines.append(f"- {o}: Dice {fmt_ci(e)}, {e.mean - base_dice:+.3f} over the baseline")
    lines += [
        "",
        "Share of the baseline -> ceiling Dice gap each method closes (negative: it moves away):",
        "",
        "| method | Dice vs baseline | " + " | ".join(f"of {o} gap" for o in oracles) + " |",
        "|---|---:|" + "---:|" * len(oracles),
    ]
    for method in ("best_fixed_prompt", *BASELINE_METHODS, *RL_METHODS):
        if method not in summaries:
            continue
        gain = summaries[method].metrics["dice"].mean - base_dice
        cells = []
        for o in oracles:
            gap = summaries[o].metrics["dice"].mean - base_dice
            cells.append(f"{100 * gain / gap:.0f}%" if gap > 1e-9 else "n/a (no gap)")
        lines.append(f"| {method} | {gain:+.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _missing_methods(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> list[str]:
    status = record.facts["trials"]
    lines = []
    for trial, method in ((t.name, t.method) for t in PPO_TRIALS):
        if method not in summaries and trial in status:
            lines.append(
                f"- {method}: not evaluated (trial `{trial}` is {status[trial]}, no policy)"
            )
    return lines
