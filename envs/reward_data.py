"""Training examples for the reward network: masks a policy could actually produce.

For every labelled image, ``per_image`` masks, each scored against the ground truth with
:func:`models.metrics.mask_metrics`:

1. the mask of every candidate prompt, in prompt order (what the prompt-choosing policies pick
   among; a seeded random subset of them when ``per_image`` is smaller than the prompt count);
2. then masks reached by random post-processing sequences of 1 to ``max_ops`` operations, each
   starting from a random prompt's mask (what the post-processing experiment can reach);
3. then ``soft`` perturbed soft masks (:func:`perturbed_soft_mask` of a random prompt's soft
   mask; what a fine-tuned mask head outputs), scored by their hard mask ``> 0.5``.

So the data covers good and bad masks of each image, and an image's examples share one image
channel (see :class:`models.reward_net.RewardExample`). Every image is segmented once per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from envs.sample import Sample
from models.errors import UserError
from models.metrics import mask_metrics
from models.reward_net import RewardExample, image_channel, mask_channel
from models.segmentation import Segmenter, segment_all

SOFT_SHIFT = 2.5
"""Perturbed soft masks: the logit shift is uniform in +-this."""
SOFT_NOISE = 2.0
"""Perturbed soft masks: the smooth logit noise's standard deviation is uniform in [0, this]."""
SOFT_GRID = 8
"""Perturbed soft masks: the noise is drawn on a grid this many cells wide, then upsampled."""


def perturbed_soft_mask(prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``sigmoid(a * logit(prob) + shift + noise)``: a random sharpness ``a`` in [0.7, 1.5], a
    global ``shift`` and a smooth noise field (bilinear from a coarse grid), float32 HxW."""
    logit = np.log(np.clip(prob, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(prob, 1e-6, 1 - 1e-6))
    grid = rng.normal(0.0, rng.uniform(0.0, SOFT_NOISE), (SOFT_GRID, SOFT_GRID)).astype(np.float32)
    noise = cv2.resize(grid, prob.shape[::-1], interpolation=cv2.INTER_LINEAR)
    z = rng.uniform(0.7, 1.5) * logit + rng.uniform(-SOFT_SHIFT, SOFT_SHIFT) + noise
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def candidate_masks(
    sample: Sample,
    segmenter: Segmenter,
    prompts: Sequence[str],
    rng: np.random.Generator,
    ops: MaskOpsConfig,
    per_image: int,
    max_ops: int = 3,
    soft: int = 0,
) -> list[np.ndarray]:
    """``per_image`` masks of ``sample``: prompt masks first, then random op sequences, then up
    to ``soft`` perturbed soft masks (float32; the others are bool), taken from the op
    sequences' share (see the module docstring). The random choices come from ``rng``."""
    segmentations = segment_all(segmenter, sample.image, prompts)
    states = [MaskState.from_segmentation(s) for s in segmentations]
    if per_image <= len(states):
        picks = sorted(rng.choice(len(states), size=per_image, replace=False).tolist())
        return [states[i].mask for i in picks]
    masks = [s.mask for s in states]
    probs = [s.prob for s in segmentations if s.prob is not None]
    n_soft = min(soft, per_image - len(states)) if probs else 0
    usable_ops = [op for op in ops.ops if op != "stop"]
    for _ in range(per_image - len(states) - n_soft):
        state = states[int(rng.integers(len(states)))]
        for _ in range(int(rng.integers(1, max_ops + 1))):
            state = apply_op(usable_ops[int(rng.integers(len(usable_ops)))], state, ops)
        masks.append(state.mask)
    for _ in range(n_soft):
        masks.append(perturbed_soft_mask(probs[int(rng.integers(len(probs)))], rng))
    return masks


def build_examples(
    samples: Iterable[Sample],
    segmenter: Segmenter,
    prompts: Sequence[str],
    *,
    per_image: int,
    input_size: int,
    seed: int = 0,
    ops: MaskOpsConfig | None = None,
    on_image: Callable[[int], None] | None = None,
    soft: int = 0,
) -> list[RewardExample]:
    """``per_image`` scored masks per labelled sample, in sample order (see the module docstring;
    ``soft``: how many of them are perturbed soft masks, scored by their mask ``> 0.5``).

    ``samples`` may be a lazy iterable (images are not kept, only the examples). ``on_image(i)``
    is called after each image (progress). Raises ``UserError`` at a sample without ground
    truth, before segmenting it.
    """
    if per_image < 1 or not prompts:
        raise UserError(f"need per_image >= 1 and prompts, got {per_image} and {len(prompts)}")
    ops = ops or MaskOpsConfig()
    rng = np.random.default_rng(seed)
    examples: list[RewardExample] = []
    for i, sample in enumerate(samples):
        gt = _ground_truth(sample)
        image_x = image_channel(sample.image, input_size)
        for mask in candidate_masks(sample, segmenter, prompts, rng, ops, per_image, soft=soft):
            m = mask_metrics(mask if mask.dtype == np.bool_ else mask > 0.5, gt)
            y = np.array([m.dice, m.recall, m.precision], dtype=np.float32)
            examples.append(RewardExample(sample.id, image_x, mask_channel(mask, input_size), y))
        if on_image:
            on_image(i)
    return examples


def _ground_truth(sample: Sample) -> np.ndarray:
    if sample.mask is None:
        raise UserError(
            f"image {sample.id} has no ground-truth mask: the reward network is trained on "
            "labelled images only; use a dataset whose train and val images all have masks"
        )
    return sample.mask
