"""Honest evaluation: every method on the same held-out images, deterministically.

Methods (each yields one final mask per test image):

- ``baseline``: the default prompt, no post-processing.
- ``best_fixed_prompt``: the one prompt with the best mean Dice on the TRAIN split (the simple
  baseline RL must beat).
- ``prompt_rl`` / ``reward_rl``: the greedy prompt policy of experiment 1 / 3 run for the
  episode length in its own environment; the final mask counts.
- ``postprocess_rl``: the greedy post-processing policy on the baseline mask, until ``stop``.
- ``combined``: the prompt policy's final prompt, then the post-processing policy on its mask.
- ``oracle_prompt``: the best prompt per image by ground truth (a ceiling for prompt choice).
- ``oracle_postprocess``: exhaustive search over op sequences up to the episode length from the
  baseline mask, best by ground truth (a ceiling for post-processing).

Policies see only what they saw in training (image + current mask); ground truth enters only
the metrics and the oracles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from envs.sample import Sample
from envs.segmentation_env import SegmentationEnv
from models.metrics import METRIC_NAMES, mask_metrics
from models.segmentation import Segmenter

METHODS = (
    "baseline",
    "best_fixed_prompt",
    "prompt_rl",
    "postprocess_rl",
    "reward_rl",
    "combined",
    "oracle_prompt",
    "oracle_postprocess",
)
METHOD_OF_TRIAL = {
    "prompt": "prompt_rl",
    "postprocess": "postprocess_rl",
    "reward_guided": "reward_rl",
}
Policy = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class ImageResult:
    """One method's final mask on one image, measured: a row of the per-image CSV."""

    method: str
    image_id: str
    dice: float
    recall: float
    precision: float
    iou: float
    detail: str = ""


def _result(method: str, sample: Sample, mask: np.ndarray, detail: str = "") -> ImageResult:
    assert sample.mask is not None
    m = mask_metrics(mask, sample.mask)
    return ImageResult(method, sample.id, m.dice, m.recall, m.precision, m.iou, detail)


def run_policy(
    env: SegmentationEnv, policy: Policy, image_id: str, options: Mapping[str, Any] | None = None
) -> tuple[MaskState, list[str]]:
    """Run ``policy`` greedily for one episode on ``image_id``: final state and actions taken."""
    obs, _ = env.reset(options={"image_id": image_id, **(options or {})})
    actions: list[str] = []
    terminated = truncated = False
    while not (terminated or truncated):
        obs, _, terminated, truncated, info = env.step(policy(obs))
        actions.append(info["action"])
    return env.state, actions


def best_fixed_prompt(train: Sequence[Sample], segmenter: Segmenter, prompts: Sequence[str]) -> str:
    """The prompt with the best mean ground-truth Dice on ``train`` (ties: the earlier prompt)."""
    means = [
        np.mean([mask_metrics(segmenter.segment(s.image, p).mask, s.mask).dice for s in train])  # type: ignore[arg-type]
        for p in prompts
    ]
    return prompts[int(np.argmax(means))]


def oracle_postprocess_mask(
    start: MaskState, gt: np.ndarray, ops: MaskOpsConfig, depth: int
) -> tuple[np.ndarray, list[str]]:
    """Best mask (by Dice) over every op sequence of length <= ``depth`` from ``start``."""
    usable = [op for op in ops.ops if op != "stop"]
    best: tuple[float, np.ndarray, list[str]] = (mask_metrics(start.mask, gt).dice, start.mask, [])
    frontier: list[tuple[MaskState, list[str]]] = [(start, [])]
    for _ in range(depth):
        nxt = []
        for state, seq in frontier:
            for op in usable:
                child = apply_op(op, state, ops)
                score = mask_metrics(child.mask, gt).dice
                if score > best[0]:
                    best = (score, child.mask, [*seq, op])
                nxt.append((child, [*seq, op]))
        frontier = nxt
    return best[1], best[2]


@dataclass
class Evaluator:
    """Evaluates methods on ``test`` samples with the run's environments and policies.

    Args:
        test: the held-out samples (with ground truth).
        segmenter: the shared segmenter (cache-backed in a run).
        prompts / default_prompt / max_steps / ops: the environments' settings.
    """

    test: Sequence[Sample]
    segmenter: Segmenter
    prompts: Sequence[str]
    default_prompt: str
    max_steps: int
    ops: MaskOpsConfig

    def baseline(self) -> list[ImageResult]:
        return self.fixed_prompt("baseline", self.default_prompt)

    def fixed_prompt(self, method: str, prompt: str) -> list[ImageResult]:
        return [
            _result(method, s, self.segmenter.segment(s.image, prompt).mask, prompt)
            for s in self.test
        ]

    def oracle_prompt(self) -> list[ImageResult]:
        rows = []
        for s in self.test:
            assert s.mask is not None
            masks = [self.segmenter.segment(s.image, p).mask for p in self.prompts]
            dices = [mask_metrics(m, s.mask).dice for m in masks]
            best = int(np.argmax(dices))
            rows.append(_result("oracle_prompt", s, masks[best], self.prompts[best]))
        return rows

    def oracle_postprocess(self) -> list[ImageResult]:
        rows = []
        for s in self.test:
            assert s.mask is not None
            start = MaskState.from_segmentation(
                self.segmenter.segment(s.image, self.default_prompt)
            )
            mask, seq = oracle_postprocess_mask(start, s.mask, self.ops, self.max_steps)
            rows.append(_result("oracle_postprocess", s, mask, " > ".join(seq) or "(none)"))
        return rows

    def policy(self, method: str, env: SegmentationEnv, policy: Policy) -> list[ImageResult]:
        rows = []
        for s in self.test:
            state, actions = run_policy(env, policy, s.id)
            rows.append(_result(method, s, state.mask, " > ".join(actions)))
        return rows

    def combined(
        self,
        prompt_env: SegmentationEnv,
        prompt_policy: Policy,
        post_env: SegmentationEnv,
        post_policy: Policy,
    ) -> list[ImageResult]:
        rows = []
        for s in self.test:
            _, prompt_actions = run_policy(prompt_env, prompt_policy, s.id)
            chosen = prompt_actions[-1]
            state, post_actions = run_policy(post_env, post_policy, s.id, {"base_prompt": chosen})
            rows.append(_result("combined", s, state.mask, " > ".join([chosen, *post_actions])))
        return rows


# --- statistics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% bootstrap confidence interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = 2000) -> Estimate:
    """Mean and percentile 95% CI from ``resamples`` bootstrap resamples (seeded)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        raise ValueError("no values to estimate a mean from")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    mean = float(data.mean())
    # Percentiles of resampled means can miss the sample mean by rounding on tiny samples.
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)))


@dataclass(frozen=True)
class MethodSummary:
    """A method's means with CIs, and its paired difference to the baseline with CIs."""

    method: str
    n: int
    metrics: dict[str, Estimate]
    vs_baseline: dict[str, Estimate]


def summarise(rows: Iterable[ImageResult], *, seed: int = 0) -> dict[str, MethodSummary]:
    """Per-method summaries; paired differences use the images both methods were run on."""
    by_method: dict[str, dict[str, ImageResult]] = {}
    for row in rows:
        by_method.setdefault(row.method, {})[row.image_id] = row
    base = by_method.get("baseline", {})
    out = {}
    for method, results in by_method.items():
        ids = sorted(results)
        metrics = {
            name: bootstrap_mean([getattr(results[i], name) for i in ids], seed=seed)
            for name in METRIC_NAMES
        }
        paired = [i for i in ids if i in base]
        diffs = (
            {
                name: bootstrap_mean(
                    [getattr(results[i], name) - getattr(base[i], name) for i in paired], seed=seed
                )
                for name in METRIC_NAMES
            }
            if paired
            else {}
        )
        out[method] = MethodSummary(method, len(ids), metrics, diffs)
    return out


def make_evaluator(config: Any, test: Sequence[Sample], segmenter: Segmenter) -> Evaluator:
    """An :class:`Evaluator` with a run config's environment settings."""
    return Evaluator(
        test=test,
        segmenter=segmenter,
        prompts=tuple(config.env.prompts),
        default_prompt=config.env.default_prompt,
        max_steps=config.env.max_steps,
        ops=MaskOpsConfig.from_dict(dict(config.mask_ops)),
    )
