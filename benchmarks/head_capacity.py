"""What labels can teach the Frangi head: the supervised head's Dice under a few settings,
beside what a threshold change alone reaches.

  python benchmarks/head_capacity.py [--config tune_configs/quick.yaml] [--work /tmp/head-cap]
      [--settings default,sharp_dice,...] [--seed 0]

Builds the config's data under WORK (no Ray, no reward net), computes the default prompt's
frozen inputs of the train, val and test images with a :class:`~models.frangi.FrangiSegmenter`,
then prints the mean Dice of the hard masks (the preset's rule, :func:`head_segmentation`) on
train, val and test of:

- ``baseline``: the initial head (the backend's own masks);
- ``shift +c``: the baseline's logit shifted by a constant ``c`` (a global threshold change);
- ``oracle shift``: each image's best shift in ``[-2, 2]`` (step 0.25), chosen with its label:
  the ceiling of the head's per-image ``shift`` alone;
- one row per training setting: the head trained with labels as ``supervised_finetune`` trains
  it (:func:`train_head`, keeping the evaluation with the best val Dice), its CPU seconds
  (``time.process_time``, one torch thread, frozen inputs excluded), the step kept and the val
  Dice curve. Settings: ``default`` (the config's ``finetune`` section, ``LabelLoss``),
  ``steps200_lr1e-2`` (five times the steps at lr 1e-2), ``scale2`` (the residual at half
  instead of a quarter of the resolution), ``shift_only`` (the residual frozen at zero: only
  the per-image shift learns), ``sharp_dice`` (soft Dice of ``sigmoid(4 * logit)``, a closer
  stand-in for the hard mask's Dice, without BCE), ``sharp_dice_steps200_lr1e-2`` (both).
  Each setting's row ends with how its last head (not the kept one) moved from the baseline
  on 16 training images: the mean logit change on vessel and background pixels, and its mask
  area over the label area.
  ``--seed`` replaces the config's ``finetune.seed`` (the order of the training batches; the
  head's initial weights stay those of ``torch.manual_seed(0)``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from envs.sample import Sample
from envs.sources import load_split
from models.frangi import FrangiSegmenter
from models.frangi_head import EPS, FrangiHead, FrangiHeadBackend, head_segmentation
from models.head_training import (
    HeadExample,
    HeadObjective,
    LabelLoss,
    TrainSettings,
    evaluate_head,
    soft_dice_loss,
    train_head,
)
from models.metrics import mask_metrics
from models.reward_net import image_channel
from orchestrator.config import FinetuneConfig, load_config
from orchestrator.data import prepare_data
from orchestrator.run_dir import RunPaths

SHIFTS = np.linspace(-2.0, 2.0, 17)
SPLITS = ("train", "val", "test")
DRIFT_IMAGES = 16


@dataclass
class SharpDice:
    """Soft-Dice loss of ``sigmoid(sharpness * logits)`` (no BCE term)."""

    sharpness: float = 4.0
    uses_labels: bool = True

    def loss(
        self,
        logits: torch.Tensor,
        start: torch.Tensor,
        image_x: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> torch.Tensor:
        assert truth is not None
        return soft_dice_loss(torch.sigmoid(self.sharpness * logits), truth)


@dataclass(frozen=True)
class Setting:
    head: Callable[[], FrangiHead]
    settings: TrainSettings
    objective: HeadObjective


def shift_only() -> FrangiHead:
    head = FrangiHead()
    head.residual.requires_grad_(False)
    return head


def settings_table(cfg: FinetuneConfig, seed: int) -> dict[str, Setting]:
    base = TrainSettings(cfg.steps, cfg.batch_images, cfg.lr, cfg.eval_every, seed)
    long = TrainSettings(5 * cfg.steps, cfg.batch_images, 1e-2, 4 * cfg.eval_every, seed)
    return {
        "default": Setting(FrangiHead, base, LabelLoss()),
        "steps200_lr1e-2": Setting(FrangiHead, long, LabelLoss()),
        "scale2": Setting(lambda: FrangiHead(scale=2), base, LabelLoss()),
        "shift_only": Setting(shift_only, base, LabelLoss()),
        "sharp_dice": Setting(FrangiHead, base, SharpDice()),
        "sharp_dice_steps200_lr1e-2": Setting(FrangiHead, long, SharpDice()),
    }


def examples(
    backend: FrangiHeadBackend, samples: Sequence[Sample], prompt: str
) -> list[HeadExample]:
    return [
        HeadExample(
            s.id,
            backend.frozen_inputs(s.image, [prompt])[0],
            image_channel(s.image, 64),
            s.mask,
        )
        for s in samples
    ]


def shifted_dice(split: Sequence[HeadExample]) -> np.ndarray:
    """Dice (images x SHIFTS) of the baseline's logit shifted by each of SHIFTS."""
    rows = []
    for e in split:
        assert e.truth is not None
        prob = e.inputs.tensors["prob"].clamp(EPS, 1 - EPS)
        base = torch.logit(prob)
        rows.append(
            [
                mask_metrics(
                    head_segmentation(torch.sigmoid(base + c).numpy(), e.inputs).mask,
                    e.truth,
                ).dice
                for c in SHIFTS
            ]
        )
    return np.array(rows)


def row(name: str, values: Sequence[float], extra: str = "") -> str:
    return f"{name:<18}" + "".join(f"{v:8.4f}" for v in values) + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tune_configs/quick.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/head-capacity"))
    parser.add_argument("--settings", default="", help="comma separated (default: all)")
    parser.add_argument("--seed", type=int, help="batch order seed (default: finetune.seed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data(config, RunPaths(args.work.resolve()))
    backend = FrangiHeadBackend(FrangiSegmenter())
    prompt, cap = config.env.default_prompt, config.finetune.max_images
    data = {
        split: examples(
            backend,
            load_split(prepared.ref, split, None if split == "test" else cap),
            prompt,
        )
        for split in SPLITS
    }
    print(", ".join(f"{len(v)} {k}" for k, v in data.items()) + f" images; prompt {prompt!r}")
    print(f"{'':<18}{'train':>8}{'val':>8}{'test':>8}")
    grids = {split: shifted_dice(data[split]) for split in SPLITS}
    for c in (-1.0, -0.5, 0.0, 0.5, 1.0):
        column = int(np.argmin(np.abs(SHIFTS - c)))
        name = "baseline" if c == 0 else f"shift {c:+.1f}"
        print(row(name, [grids[s][:, column].mean() for s in SPLITS]))
    print(row("oracle shift", [grids[s].max(axis=1).mean() for s in SPLITS]))
    seed = config.finetune.seed if args.seed is None else args.seed
    table = settings_table(config.finetune, seed)
    for name in [s for s in args.settings.split(",") if s] or list(table):
        print(trained_row(name, table[name], data))


def trained_row(name: str, setting: Setting, data: dict[str, list[HeadExample]]) -> str:
    """The row of the head trained with ``setting`` (see the module docstring)."""
    torch.manual_seed(0)
    head = setting.head()
    start = time.process_time()
    result = train_head(
        head,
        data["train"],
        setting.objective,
        setting.settings,
        lambda step: evaluate_head(head, data["val"], head_segmentation, None, 0.0, step),
        lambda point: point.gt_dice,
    )
    seconds = time.process_time() - start
    drift = logit_drift(head, data["train"][:DRIFT_IMAGES])
    head.load_state_dict(result.state)
    head.eval()
    dice = [evaluate_head(head, data[s], head_segmentation, None, 0.0, 0).gt_dice for s in SPLITS]
    curve = " ".join(f"{p.step}:{p.gt_dice:.3f}" for p in result.history)
    return row(
        name,
        dice,
        f"  {seconds:5.1f} CPU s, kept step {result.selected_step}; val {curve}; "
        f"last head: {drift}",
    )


def logit_drift(head: FrangiHead, split: Sequence[HeadExample]) -> str:
    """How the head moved from the baseline on ``split``: the mean change of its logit on
    vessel and on background pixels, and its hard masks' area over the labels' area."""
    head.eval()
    vessel, background, area, truth_area = [], [], 0, 0
    with torch.no_grad():
        for e in split:
            assert e.truth is not None
            logits = head(e.inputs)
            change = logits - torch.logit(e.inputs.tensors["prob"].clamp(EPS, 1 - EPS))
            truth = torch.from_numpy(e.truth)
            vessel.append(float(change[truth].mean()))
            background.append(float(change[~truth].mean()))
            area += int(head_segmentation(torch.sigmoid(logits).numpy(), e.inputs).mask.sum())
            truth_area += int(e.truth.sum())
    return (
        f"logit change {np.mean(vessel):+.2f} on vessels, {np.mean(background):+.2f} on "
        f"background, mask area / label area {area / truth_area:.2f} (train, {len(split)} images)"
    )


if __name__ == "__main__":
    main()
