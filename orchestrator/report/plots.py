"""The report's plots (``plots/*.png``), drawn from a run's files with a fixed size and no
metadata that changes between runs, so a rebuild is byte-identical."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import UserError
from models.reward_net import TARGETS
from orchestrator import metric_keys as mk
from orchestrator import run_dir
from orchestrator.evaluation.examples import (
    EXAMPLE_ROLES,
    example_mask_path,
    pick_examples,
    read_mask_png,
)
from orchestrator.evaluation.statistics import MethodSummary, best_method, ordered
from orchestrator.experiments import PPO_TRIALS, parse_instance
from orchestrator.report.finetune import read_histories
from orchestrator.report.record import RunRecord, TuneTrial, relative
from orchestrator.report.verdicts import TARGET
from orchestrator.training.reward_predictions import RewardNetPredictions

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_DPI = 100
PLOT_SIZES = {
    "metrics.png": (11.0, 4.8),
    "learning_curves.png": (15.0, 9.0),
    "reward_net_dice.png": (6.0, 6.0),
    "examples.png": (12.0, 9.6),
    "reward_hacking.png": (11.0, 4.2),
}
"""Every plot's file name (under ``plots/``) and size in inches; pixels = inches * PLOT_DPI."""


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
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": None})
        run_dir.write_bytes(out / name, buffer.getvalue())


def write_plots(record: RunRecord, summaries: Mapping[str, MethodSummary]) -> dict[str, str | None]:
    """Draw every plot into ``plots/``; returns file name -> None (drawn) or why it is not.
    A plot that cannot be drawn is removed, so no stale file outlives a rebuild."""
    out = record.paths.plots
    drawers: dict[str, Callable[[], str | None]] = {
        "metrics.png": lambda: plot_metrics(summaries, out),
        "learning_curves.png": lambda: plot_learning_curves(record.trials, out),
        "reward_net_dice.png": lambda: plot_reward_net(record.predictions, out),
        "examples.png": lambda: plot_examples(record, summaries, out),
        "reward_hacking.png": lambda: plot_hacking(read_histories(record), out),
    }
    status = {}
    for name, draw in drawers.items():
        status[name] = draw()
        if status[name] is not None:
            (out / name).unlink(missing_ok=True)
    return status


def plot_metrics(summaries: Mapping[str, MethodSummary], out: Path) -> str | None:
    """Bars of mean Dice and Recall per method with 95% CI error bars and the goal line."""
    in_order = ordered(summaries)
    if not in_order:
        return "no evaluated methods"
    names = [s.method for s in in_order]
    with _figure("metrics.png", out, nrows=1, ncols=2, sharey=True) as (fig, axes):
        for ax, metric in zip(axes, ("dice", "recall"), strict=True):
            est = [s.metrics[metric] for s in in_order]
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
    """Per PPO experiment: ``rollout/ep_rew_mean``, the episodes' final GT Dice (and the
    reward net's score for the reward-guided one) and the policy's entropy against env steps
    (an entropy that drops to ~0 early means the policy collapsed onto one action); one line
    per training seed."""
    seeds: dict[str, list[tuple[int, TuneTrial]]] = {}
    for t in trials:
        spec, seed = parse_instance(t.name)
        seeds.setdefault(spec.name, []).append((seed, t))
    if not any(t.name in seeds for t in PPO_TRIALS):
        return "no PPO trial in the Tune experiment"
    with _figure("learning_curves.png", out, nrows=len(PPO_TRIALS), ncols=3) as (fig, axes):
        for row, spec in enumerate(PPO_TRIALS):
            name = spec.name
            trial = sorted(seeds.get(name, []), key=lambda pair: pair[0])
            left, right, entropy = axes[row]
            _curve(left, trial, [(mk.EP_REW_MEAN, mk.EP_REW_MEAN, "tab:blue")])
            left.set_ylabel("episode return (mean)")
            left.set_title(f"{name}: {mk.EP_REW_MEAN}")
            series = [(mk.GT_DICE, f"ground-truth Dice ({mk.GT_DICE})", "tab:green")]
            if spec.needs_reward_net:
                label = f"reward-net score ({mk.REWARD_NET_SCORE})"
                series.append((mk.REWARD_NET_SCORE, label, "tab:purple"))
            _curve(right, trial, series)
            right.set_ylabel("score of the episode's final mask")
            right.set_title(f"{name}: final-mask quality")
            _curve(entropy, trial, [(mk.ENTROPY, f"policy entropy ({mk.ENTROPY})", "tab:red")])
            entropy.set_ylabel("entropy (nats)")
            entropy.set_title(f"{name}: policy entropy")
            for ax in (left, right, entropy):
                ax.set_xlabel("env steps (" + mk.ENV_STEPS + ")")
                ax.grid(alpha=0.3)
        fig.suptitle("Learning curves (100-episode means, per training iteration)")
    return None


SEED_STYLES = ("-", "--", ":", "-.")


def _curve(
    ax: Axes, seeds: Sequence[tuple[int, TuneTrial]], series: Sequence[tuple[str, str, str]]
) -> None:
    """The ``series`` of every seed's trial (line style per seed, labelled when several)."""
    with_results = [(k, t) for k, t in seeds if mk.ENV_STEPS in t.results]
    if not with_results:
        note = f"no results ({seeds[0][1].status})" if seeds else "trial not in this run"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        return
    drawn = False
    for seed, trial in with_results:
        for key, label, colour in series:
            if key not in trial.results:
                continue
            frame = trial.results[[mk.ENV_STEPS, key]].dropna()
            shown = f"{label}, seed {seed}" if len(seeds) > 1 else label
            style = SEED_STYLES[seed % len(SEED_STYLES)]
            ax.plot(
                frame[mk.ENV_STEPS], frame[key], style, marker="o", ms=3, color=colour, label=shown
            )
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


def plot_hacking(histories: Mapping[str, Mapping[str, Any]], out: Path) -> str | None:
    """The reward-hacking panel: the reward net's score (left) and the ground-truth Dice
    (right) of each fine-tuned head on the val images along training, one line per trial and
    seed, the kept step circled. The two diverge where the head learns to please the reward net.
    """
    if not histories:
        return "no fine-tuning trial in this run"
    colours = {"reward_finetune": "tab:orange", "supervised_finetune": "tab:blue"}
    with _figure("reward_hacking.png", out, nrows=1, ncols=2, sharex=True) as (fig, axes):
        for name, history in sorted(histories.items()):
            spec, seed = parse_instance(name)
            points = history["points"]
            steps = [p["step"] for p in points]
            style = {"color": colours.get(spec.name, "k"), "alpha": 1.0 if seed == 0 else 0.55}
            label = spec.name if seed == 0 else None
            kept = [i for i, p in enumerate(points) if p["step"] == history["selected_step"]]
            for ax, key in zip(axes, ("reward_net_score", "gt_dice"), strict=True):
                values = [p[key] for p in points]
                if all(np.isnan(v) for v in values):
                    continue
                ax.plot(steps, values, marker=".", label=label, **style)
                for i in kept:
                    ax.plot(steps[i], values[i], "o", mfc="none", ms=10, color=style["color"])
        titles = ("Reward-net score (what reward_finetune maximises)", "GT Dice (reference only)")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
        axes[1].legend(loc="best", fontsize=8, title="trial (faint: other seeds)")
        fig.suptitle("Reward hacking? Val images along fine-tuning; circles: the kept head")
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
    directory = record.paths.examples_dir
    needed = [
        example_mask_path(directory, m, i) for i in picks.values() for m in ("baseline", best)
    ]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        return f"example mask {relative(missing[0], record.paths.root)} is missing"
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
    from envs.sources import validated_dataset
    from orchestrator.data import data_dir, group_pattern

    root = data_dir(record.config, record.paths)
    if not root.exists():
        raise UserError(
            f"the run's dataset {root} is gone; the report's example overlays need its images: "
            "restore it (or rebuild the report where it exists)"
        )
    data = record.config.data
    dataset = validated_dataset(
        str(root), data.format, group_pattern(data), data.skip_bad, require_masks=True
    )
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
