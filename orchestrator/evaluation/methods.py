"""Honest evaluation: every method on the same held-out images, deterministically.

Methods (each yields one final mask per test image):

- ``baseline``: the default prompt, no post-processing.
- ``best_fixed_prompt``: the one prompt with the best mean Dice on the TRAIN split (the simple
  baseline RL must beat).
- ``prompt_rl`` / ``reward_rl``: the greedy prompt policy of experiment 1 / 3 run for the
  episode length in its own environment; the final mask counts.
- ``postprocess_rl``: the greedy post-processing policy on the baseline mask, until ``stop``.
- ``combined``: the prompt policy's final prompt, then the post-processing policy trained on the
  prompt policy's masks (the ``combined`` trial) on its mask.
- ``reward_finetune`` / ``supervised_finetune``: the default prompt through the mask head
  fine-tuned against the reward net (no labels) / with the labels.
- ``bandit_prompt``, ``supervised_prompt``, ``supervised_ops``, ``best_fixed_ops``: the learners
  a reviewer compares RL with (:mod:`~orchestrator.evaluation.baselines`).
- ``oracle_prompt``: the best prompt per image by ground truth (a ceiling for prompt choice).
- ``oracle_postprocess``: exhaustive search over op sequences up to the episode length from the
  baseline mask, best by ground truth (a ceiling for post-processing).

Policies see only what they saw in training (image + current mask); ground truth enters only
the metrics and the oracles.

Statistics are in :mod:`~orchestrator.evaluation.statistics`, the oracles' searches in
:mod:`~orchestrator.evaluation.oracles`, the per-image CSV in
:mod:`~orchestrator.evaluation.per_image`.

Example masks: an :class:`Evaluator` with ``examples_dir`` set picks three test images from the
baseline's Dice (worst, median, best: :func:`pick_examples`) when it computes the baseline, and
from then on saves every method's final mask of those images as a PNG
(:func:`example_mask_path`), so the report can draw overlays without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState
from envs.op_tree import apply_sequence
from envs.rollout import Policy, final_prompts, run_policy
from envs.sample import Sample
from envs.segmentation_env import SegmentationEnv
from models.metrics import mask_metrics
from models.segmentation import Segmenter, segment_all
from orchestrator.config import RunConfig
from orchestrator.evaluation.examples import example_mask_path, pick_examples, write_mask_png
from orchestrator.evaluation.oracles import oracle_postprocess_mask
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.experiments import HEAD_METHODS, RL_METHODS

BASELINE_METHODS = ("bandit_prompt", "supervised_prompt", "supervised_ops", "best_fixed_ops")
"""The non-RL learners every RL method is compared with (see :mod:`.baselines`)."""
PROMPT_BASELINES = ("best_fixed_prompt", "bandit_prompt", "supervised_prompt")
OPS_BASELINES = ("best_fixed_ops", "supervised_ops")
METHODS = (
    "baseline",
    "best_fixed_prompt",
    *BASELINE_METHODS,
    *RL_METHODS,
    *HEAD_METHODS,
    "oracle_prompt",
    "oracle_postprocess",
)
"""Every evaluation method, in report order (the RL ones come from the experiment registry)."""
SequencePicker = Callable[[np.ndarray], tuple[str, ...]]


def _result(method: str, sample: Sample, mask: np.ndarray, detail: str = "") -> ImageResult:
    assert sample.mask is not None
    m = mask_metrics(mask, sample.mask)
    return ImageResult(method, sample.id, m.dice, m.recall, m.precision, m.iou, detail)


def best_fixed_prompt(train: Sequence[Sample], segmenter: Segmenter, prompts: Sequence[str]) -> str:
    """The prompt with the best mean ground-truth Dice on ``train`` (ties: the earlier prompt)."""
    dice: list[list[float]] = [[] for _ in prompts]  # per prompt, in train order
    for s in train:
        assert s.mask is not None
        for column, seg in zip(dice, segment_all(segmenter, s.image, prompts), strict=True):
            column.append(mask_metrics(seg.mask, s.mask).dice)
    return prompts[int(np.argmax([np.mean(column) for column in dice]))]


@dataclass
class Evaluator:
    """Evaluates methods on ``test`` samples with the run's environments and policies.

    Args:
        test: the held-out samples (with ground truth).
        segmenter: the shared segmenter (cache-backed in a run).
        prompts / default_prompt / ops: the environments' settings.
        max_steps: the post-processing episode length (the oracle's search depth).
        examples_dir: where to save example masks (None: save none). Call :meth:`baseline`
            first: it chooses ``keep_ids``; every later method saves its masks of those ids.
        keep_ids: image ids whose final masks are saved (set by :meth:`baseline`).
    """

    test: Sequence[Sample]
    segmenter: Segmenter
    prompts: Sequence[str]
    default_prompt: str
    max_steps: int
    ops: MaskOpsConfig
    examples_dir: Path | None = None
    keep_ids: frozenset[str] = field(default_factory=frozenset)

    def _measure(self, method: str, sample: Sample, mask: np.ndarray, detail: str) -> ImageResult:
        if self.examples_dir is not None and sample.id in self.keep_ids:
            write_mask_png(example_mask_path(self.examples_dir, method, sample.id), mask)
        return _result(method, sample, mask, detail)

    def baseline(self) -> list[ImageResult]:
        """The default prompt; with ``examples_dir`` set, also picks and saves the examples."""
        masks = {s.id: self.segmenter.segment(s.image, self.default_prompt).mask for s in self.test}
        rows = [_result("baseline", s, masks[s.id], self.default_prompt) for s in self.test]
        if self.examples_dir is not None and rows:
            self.keep_ids = frozenset(pick_examples(rows).values())
            for image_id in sorted(self.keep_ids):
                path = example_mask_path(self.examples_dir, "baseline", image_id)
                write_mask_png(path, masks[image_id])
        return rows

    def fixed_prompt(self, method: str, prompt: str) -> list[ImageResult]:
        return [
            self._measure(method, s, self.segmenter.segment(s.image, prompt).mask, prompt)
            for s in self.test
        ]

    def oracle_prompt(self) -> list[ImageResult]:
        rows = []
        for s in self.test:
            assert s.mask is not None
            masks = [seg.mask for seg in segment_all(self.segmenter, s.image, self.prompts)]
            dices = [mask_metrics(m, s.mask).dice for m in masks]
            best = int(np.argmax(dices))
            rows.append(self._measure("oracle_prompt", s, masks[best], self.prompts[best]))
        return rows

    def oracle_postprocess(self) -> list[ImageResult]:
        rows = []
        for s in self.test:
            assert s.mask is not None
            start = MaskState.from_segmentation(
                self.segmenter.segment(s.image, self.default_prompt)
            )
            mask, seq = oracle_postprocess_mask(start, s.mask, self.ops, self.max_steps)
            rows.append(self._measure("oracle_postprocess", s, mask, " > ".join(seq) or "(none)"))
        return rows

    def policy(self, method: str, env: SegmentationEnv, policy: Policy) -> list[ImageResult]:
        rows = []
        for s in self.test:
            state, actions = run_policy(env, policy, s.id)
            rows.append(self._measure(method, s, state.mask, " > ".join(actions)))
        return rows

    def sequences(
        self, method: str, env: SegmentationEnv, pick: SequencePicker
    ) -> list[ImageResult]:
        """Apply the op sequence ``pick`` chooses from ``env``'s observation at reset."""
        rows = []
        for s in self.test:
            obs, _ = env.reset(options={"image_id": s.id})
            sequence = pick(obs)
            state = apply_sequence(env.state, sequence, self.ops)
            rows.append(self._measure(method, s, state.mask, " > ".join(sequence) or "(none)"))
        return rows

    def combined(
        self,
        prompt_env: SegmentationEnv,
        prompt_policy: Policy,
        post_env: SegmentationEnv,
        post_policy: Policy,
    ) -> list[ImageResult]:
        rows = []
        chosen_prompts = final_prompts(prompt_env, prompt_policy, [s.id for s in self.test])
        for s in self.test:
            chosen = chosen_prompts[s.id]
            state, post_actions = run_policy(post_env, post_policy, s.id, {"base_prompt": chosen})
            detail = " > ".join([chosen, *post_actions])
            rows.append(self._measure("combined", s, state.mask, detail))
        return rows


def make_evaluator(
    config: RunConfig,
    test: Sequence[Sample],
    segmenter: Segmenter,
    examples_dir: Path | None = None,
) -> Evaluator:
    """An :class:`Evaluator` with a run config's environment settings."""
    return Evaluator(
        test=test,
        segmenter=segmenter,
        prompts=tuple(config.env.prompts),
        default_prompt=config.env.default_prompt,
        max_steps=config.env.steps_for("postprocess"),
        ops=MaskOpsConfig.from_dict(dict(config.mask_ops)),
        examples_dir=examples_dir,
    )
