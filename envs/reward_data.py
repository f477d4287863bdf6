"""Training examples for the reward network: masks a policy could actually produce.

For every labelled image: the mask of every candidate prompt, and masks reached from those by
random post-processing sequences of up to ``max_ops`` operations (what experiments 1 and 2 can
reach), each scored against the ground truth. ``per_image`` of them are kept per image, chosen
with a seeded RNG, so the data set covers good and bad masks of each image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from envs.sample import Sample
from models.errors import UserError
from models.reward_net import RewardExample, make_example
from models.segmentation import Segmenter


def candidate_masks(
    sample: Sample,
    segmenter: Segmenter,
    prompts: Sequence[str],
    rng: np.random.Generator,
    ops: MaskOpsConfig,
    n_op_sequences: int,
    max_ops: int = 3,
) -> list[np.ndarray]:
    """Every prompt's mask, then ``n_op_sequences`` random op sequences on random prompt masks."""
    states = [MaskState.from_segmentation(segmenter.segment(sample.image, p)) for p in prompts]
    masks = [s.mask for s in states]
    usable_ops = [op for op in ops.ops if op != "stop"]
    for _ in range(n_op_sequences):
        state = states[int(rng.integers(len(states)))]
        for _ in range(int(rng.integers(1, max_ops + 1))):
            state = apply_op(usable_ops[int(rng.integers(len(usable_ops)))], state, ops)
        masks.append(state.mask)
    return masks


def build_examples(
    samples: Sequence[Sample],
    segmenter: Segmenter,
    prompts: Sequence[str],
    *,
    per_image: int,
    input_size: int,
    seed: int = 0,
    ops: MaskOpsConfig | None = None,
    on_image: Callable[[int], None] | None = None,
) -> list[RewardExample]:
    """``per_image`` scored masks per labelled sample (see the module docstring).

    ``on_image(i)`` is called after each image (progress).
    """
    ops = ops or MaskOpsConfig()
    rng = np.random.default_rng(seed)
    examples: list[RewardExample] = []
    for i, sample in enumerate(samples):
        if sample.mask is None:
            raise UserError(
                f"image {sample.id} has no ground-truth mask: the reward network is trained on "
                "labelled images only (the train split of a labelled dataset)"
            )
        masks = candidate_masks(sample, segmenter, prompts, rng, ops, n_op_sequences=per_image)
        for j in rng.choice(len(masks), size=min(per_image, len(masks)), replace=False):
            examples.append(
                make_example(sample.id, sample.image, masks[j], sample.mask, input_size)
            )
        if on_image:
            on_image(i)
    return examples
