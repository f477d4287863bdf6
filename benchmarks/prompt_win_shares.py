"""Does prompt choice matter per image? Per-prompt win shares of a prompt set on the default data.

For every frame of the default synthetic data (``sa2va-rl demo-data``: 160 frames, seed 0) and
every prompt of a set (``models.prompts.PROMPT_SETS``), the Frangi backend's mask is scored by
Dice. A prompt *wins* an image when it gives the best Dice there; ties go to the prompt listed
first (``np.argmax``), and the ``split`` column shares tied images equally instead. Prints each
prompt's preset, win share, split share and mean Dice, then the default prompt's mean Dice, the
best fixed prompt's and the per-image oracle's.

Usage::

    PYTHONPATH=$PWD python benchmarks/prompt_win_shares.py [--set seeds] [--frames 160]
"""

from __future__ import annotations

import argparse

import numpy as np

from envs.synthetic import generate_samples
from models.frangi import FrangiSegmenter, preset_name_for
from models.metrics import mask_metrics
from models.prompts import PROMPT_SETS, prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="seeds", choices=sorted(PROMPT_SETS))
    parser.add_argument("--frames", type=int, default=160)
    args = parser.parse_args()
    prompts = prompt_set(args.set)
    segmenter = FrangiSegmenter()
    dice = np.array(
        [
            [mask_metrics(segmenter.segment(s.image, p).mask, s.mask).dice for p in prompts]
            for s in generate_samples(args.frames)
        ]
    )  # (images, prompts)
    best = dice.max(axis=1, keepdims=True)
    wins = np.bincount(dice.argmax(axis=1), minlength=len(prompts)) / len(dice)
    tied = dice == best
    split = (tied / tied.sum(axis=1, keepdims=True)).sum(axis=0) / len(dice)
    ties = int((tied.sum(axis=1) > 1).sum())
    print(f"prompt set {args.set!r}, {len(dice)} frames; images with a tie: {ties}")
    print(f"{'win':>6} {'split':>6} {'dice':>6}  {'preset':16s} prompt")
    for prompt, w, sp, mean in zip(prompts, wins, split, dice.mean(axis=0), strict=True):
        print(f"{w:6.3f} {sp:6.3f} {mean:6.3f}  {preset_name_for(prompt):16s} {prompt}")
    fixed = int(dice.mean(axis=0).argmax())
    print(
        f"default prompt {dice[:, 0].mean():.3f}, best fixed {dice[:, fixed].mean():.3f} "
        f"({prompts[fixed]!r}), oracle {best.mean():.3f}"
    )


if __name__ == "__main__":
    main()
