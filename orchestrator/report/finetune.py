"""The report's fine-tuning section: baseline, ``reward_finetune`` and ``supervised_finetune``
on the same test images, the share of the supervised gain the reward net recovers, the
reward-hacking panel (reward-net score vs ground-truth Dice on the val images along training)
and the reward net's error on the head's masks beside its error on the prompt's masks.

Read from ``eval/per_image.csv`` (through the method summaries) and
``finetune/<trial>/history.json`` (:mod:`orchestrator.training.finetune`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from orchestrator.evaluation.statistics import UNDETERMINED, Estimate, MethodSummary, verdict
from orchestrator.experiments import (
    HEAD_TRIALS,
    REWARD_FINETUNE,
    SUPERVISED_FINETUNE,
    instance_name,
    trial,
)
from orchestrator.report.record import RunRecord
from orchestrator.training.finetune import HISTORY_FILE, trial_dir

DIVERGENCE = 0.005
"""Val GT Dice this much below its start while the reward-net score rose: the head learned to
please the reward net (reward hacking)."""


def read_histories(record: RunRecord) -> dict[str, dict[str, Any]]:
    """Fine-tuning trial instance (``reward_finetune``, ``reward_finetune_seed1``, ...) -> its
    ``history.json``, for those that wrote one, seed by seed."""
    found = {}
    for t in HEAD_TRIALS:
        for seed in range(record.config.ppo.seeds):
            name = instance_name(t, seed)
            path = trial_dir(record.paths, name) / HISTORY_FILE
            if path.is_file():
                found[name] = json.loads(path.read_text())
    return found


def render(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> str:
    """The section's markdown ("not run" when the run has no fine-tuning trial)."""
    lines = ["## Fine-tuning the mask head (reward net vs labels)", ""]
    histories = read_histories(record)
    methods = [t.method for t in HEAD_TRIALS if t.method in summaries]
    if not methods and not histories:
        return "\n".join([*lines, "Not run (the `finetune` experiment is not in this run)."])
    lines += _comparison(summaries)
    lines += _hacking(histories)
    lines += _reward_net_error(record, histories)
    lines += _costs(histories)
    return "\n".join(lines)


def _ci(e: Estimate) -> str:
    return f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"


def _paired(e: Estimate) -> str:
    return f"{e.mean:+.3f} [{e.low:.3f}, {e.high:.3f}] ({verdict(e)})"


def _comparison(summaries: Mapping[str, MethodSummary]) -> list[str]:
    shown = ("baseline", REWARD_FINETUNE.method, SUPERVISED_FINETUNE.method)
    present = [m for m in shown if m is not None and m in summaries]
    lines = [
        "Same test images, default prompt; mean [95% CI] and the paired difference to the "
        "baseline (per image).",
        "",
        "| method | Dice | Recall | Dice vs baseline | Recall vs baseline |",
        "|---|---|---|---|---|",
    ]
    for m in present:
        s = summaries[m]
        paired = s.paired.get("baseline", {})
        shown_pairs = {} if m == "baseline" else paired
        cells = [_paired(shown_pairs[k]) if k in shown_pairs else "-" for k in ("dice", "recall")]
        lines.append(
            f"| {m} | {_ci(s.metrics['dice'])} | {_ci(s.metrics['recall'])} | "
            f"{cells[0]} | {cells[1]} |"
        )
    lines += ["", *_verdict_lines(summaries), ""]
    return lines


def _verdict_lines(summaries: Mapping[str, MethodSummary]) -> list[str]:
    reward, supervised = str(REWARD_FINETUNE.method), str(SUPERVISED_FINETUNE.method)
    base = summaries.get("baseline")
    if base is None or reward not in summaries:
        return ["reward_finetune was not evaluated."]
    r = summaries[reward]
    lines = []
    dice = r.paired.get("baseline", {}).get("dice")
    if dice is not None:
        beats = {
            "better": "beats",
            "worse": "is worse than",
            "no significant difference": "does not significantly beat",
            UNDETERMINED: "cannot be compared (one test video) with",
        }[verdict(dice)]
        lines.append(f"- reward_finetune **{beats}** the baseline on Dice ({dice.mean:+.3f}).")
    if supervised in summaries:
        for key in ("dice", "recall"):
            gain = summaries[supervised].metrics[key].mean - base.metrics[key].mean
            got = r.metrics[key].mean - base.metrics[key].mean
            share = f"{100 * got / gain:.0f}%" if gain > 1e-9 else "n/a (labels gain nothing)"
            lines.append(
                f"- Share of the supervised {key.capitalize()} gain ({gain:+.3f}) that "
                f"reward_finetune recovers ({got:+.3f}): {share}."
            )
    for oracle in ("oracle_prompt", "oracle_postprocess"):
        if oracle in summaries:
            ceiling = summaries[oracle].metrics["dice"].mean
            above = r.metrics["dice"].mean > ceiling
            lines.append(
                f"- reward_finetune Dice {r.metrics['dice'].mean:.3f} is "
                f"{'above' if above else 'below'} the {oracle} ceiling ({ceiling:.3f})."
            )
    return lines


def _hacking(histories: Mapping[str, dict[str, Any]]) -> list[str]:
    lines = ["### Reward hacking: reward-net score vs ground-truth Dice along training", ""]
    history = histories.get(REWARD_FINETUNE.name)
    if history is None:
        return [*lines, "No reward_finetune history (`finetune/reward_finetune/history.json`).", ""]
    points = history["points"]
    seeds = {n: h for n, h in histories.items() if trial(n) is REWARD_FINETUNE}
    lines += [
        f"Val images ({history['val_images']}), evaluated every few steps; the kept head "
        f"(step {history['selected_step']}) is the one with the best reward-net score (no "
        "labels). GT Dice is a reference only. Method: "
        f"`{history['method']}`.",
        "",
        "| step | reward-net score | GT Dice | reward-net Dice error |",
        "|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['step']} | {_num(p['reward_net_score'])} | {_num(p['gt_dice'])} | "
            f"{_num(p['reward_net_mae'])} |"
        )
    lines.append("")
    if len(seeds) == 1:
        return [*lines, _hacking_verdict(points), "", "Plotted: `plots/reward_hacking.png`.", ""]
    lines.append("The table is seed 0's; each training seed's verdict:")
    lines.append("")
    for name, seeded in seeds.items():
        lines.append(
            f"- `{name}` (seed {seeded.get('seed', '?')}): {_hacking_verdict(seeded['points'])}"
        )
    return [*lines, "", "Plotted, every seed: `plots/reward_hacking.png`.", ""]


def _hacking_verdict(points: list[dict[str, float]]) -> str:
    first, last = points[0], points[-1]
    if any(math.isnan(p["gt_dice"]) for p in points):
        return "No val labels: the curve cannot be checked against ground truth."
    diverged = [
        p
        for p in points[1:]
        if p["reward_net_score"] > first["reward_net_score"]
        and p["gt_dice"] < first["gt_dice"] - DIVERGENCE
    ]
    if diverged:
        worst = min(diverged, key=lambda p: p["gt_dice"])
        return (
            f"**The head learned to please the reward net (reward hacking)**: at step "
            f"{worst['step']} the reward-net score rose ({first['reward_net_score']:.3f} -> "
            f"{worst['reward_net_score']:.3f}) while the val GT Dice fell "
            f"({first['gt_dice']:.3f} -> {worst['gt_dice']:.3f})."
        )
    return (
        "No divergence: no evaluation raised the reward-net score while the val GT Dice fell by "
        f"more than {DIVERGENCE} (score {first['reward_net_score']:.3f} -> "
        f"{last['reward_net_score']:.3f}, GT Dice {first['gt_dice']:.3f} -> {last['gt_dice']:.3f})."
    )


def _reward_net_error(record: RunRecord, histories: Mapping[str, dict[str, Any]]) -> list[str]:
    history = histories.get(REWARD_FINETUNE.name)
    if history is None:
        return []
    kept = next(p for p in history["points"] if p["step"] == history["selected_step"])
    start = history["points"][0]
    overall = (record.reward_net or {}).get("targets", {}).get("dice", {}).get("mae")
    lines = [
        "### Is the reward net fit to score the head?",
        "",
        "Mean |predicted Dice - true Dice| on the val images:",
        "",
        f"- the default prompt's own hard masks: {_num(history['prompt_mask_mae'])}",
        f"- the initial head's soft masks (the same masks, soft): {_num(start['reward_net_mae'])}",
        f"- the fine-tuned head's soft masks (kept step {kept['step']}): "
        f"{_num(kept['reward_net_mae'])}",
    ]
    if overall is not None:
        lines.append(
            f"- all of its validation examples (prompt, post-processed and perturbed soft masks): "
            f"{overall:.4f}"
        )
    return [*lines, ""]


def _costs(histories: Mapping[str, dict[str, Any]]) -> list[str]:
    if not histories:
        return []
    parts = [
        f"{name} {h['cpu_seconds']:.1f} CPU s ({h['train_images']} train images, kept step "
        f"{h['selected_step']} of {h['points'][-1]['step']}"
        f"{': the initial head, i.e. the baseline' if h['selected_step'] == 0 else ''})"
        for name, h in histories.items()
    ]
    return [f"Cost and kept head: {'; '.join(parts)}."]


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"
