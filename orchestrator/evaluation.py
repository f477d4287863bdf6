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

Example masks: an :class:`Evaluator` with ``examples_dir`` set picks three test images from the
baseline's Dice (worst, median, best: :func:`pick_examples`) when it computes the baseline, and
from then on saves every method's final mask of those images as a PNG
(:func:`example_mask_path`), so the report can draw overlays without a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
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
REFERENCES = ("baseline", "best_fixed_prompt")
"""Methods every other method gets a paired difference to (see :func:`summarise`)."""
EXAMPLE_ROLES = ("worst", "median", "best")
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


def pick_examples(baseline_rows: Sequence[ImageResult]) -> dict[str, str]:
    """Role (worst, median, best by baseline Dice; ties by image id) -> image id. With fewer
    than three images some roles share an image."""
    if not baseline_rows:
        raise ValueError("no baseline rows to pick examples from")
    ordered = sorted(baseline_rows, key=lambda r: (r.dice, r.image_id))
    picks = (ordered[0], ordered[len(ordered) // 2], ordered[-1])
    return {role: row.image_id for role, row in zip(EXAMPLE_ROLES, picks, strict=True)}


def example_mask_path(directory: Path, method: str, image_id: str) -> Path:
    """Where a method's final mask of ``image_id`` is saved (a file name safe on any OS)."""
    return directory / f"{method}__{re.sub(r'[^A-Za-z0-9._()-]', '_', image_id)}.png"


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A bool mask as an 8-bit PNG (0 / 255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask.astype(np.uint8) * 255):
        raise OSError(f"could not write {path}")


def read_mask_png(path: Path) -> np.ndarray:
    """A mask written by :func:`write_mask_png`, as bool."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"no readable mask PNG at {path}")
    return image > 127


@dataclass
class Evaluator:
    """Evaluates methods on ``test`` samples with the run's environments and policies.

    Args:
        test: the held-out samples (with ground truth).
        segmenter: the shared segmenter (cache-backed in a run).
        prompts / default_prompt / max_steps / ops: the environments' settings.
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
            masks = [self.segmenter.segment(s.image, p).mask for p in self.prompts]
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
            detail = " > ".join([chosen, *post_actions])
            rows.append(self._measure("combined", s, state.mask, detail))
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


def verdict(difference: Estimate) -> str:
    """ "better" / "worse" when the paired 95% CI excludes 0, else "no significant difference"."""
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "no significant difference"


@dataclass(frozen=True)
class MethodSummary:
    """A method's means with CIs, and its paired differences to each reference method.

    Attributes:
        paired: reference method (see :data:`REFERENCES`) -> metric -> mean of the per-image
            difference ``method - reference`` with its bootstrap CI (on the shared images).
    """

    method: str
    n: int
    metrics: dict[str, Estimate]
    paired: dict[str, dict[str, Estimate]]

    @property
    def vs_baseline(self) -> dict[str, Estimate]:
        return self.paired.get("baseline", {})


def paired_difference(
    results: Mapping[str, ImageResult],
    reference: Mapping[str, ImageResult],
    *,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Metric -> mean per-image difference ``results - reference`` with its bootstrap CI, over
    the image ids both hold (empty when they share none)."""
    shared = sorted(set(results) & set(reference))
    if not shared:
        return {}
    return {
        name: bootstrap_mean(
            [getattr(results[i], name) - getattr(reference[i], name) for i in shared], seed=seed
        )
        for name in METRIC_NAMES
    }


def summarise(
    rows: Iterable[ImageResult], *, seed: int = 0, references: Sequence[str] = REFERENCES
) -> dict[str, MethodSummary]:
    """Per-method summaries (in the order methods first appear in ``rows``), with paired
    differences to every reference method present."""
    by_method: dict[str, dict[str, ImageResult]] = {}
    for row in rows:
        by_method.setdefault(row.method, {})[row.image_id] = row
    out = {}
    for method, results in by_method.items():
        ids = sorted(results)
        metrics = {
            name: bootstrap_mean([getattr(results[i], name) for i in ids], seed=seed)
            for name in METRIC_NAMES
        }
        paired = {
            ref: paired_difference(results, by_method[ref], seed=seed)
            for ref in references
            if ref in by_method
        }
        out[method] = MethodSummary(method, len(ids), metrics, paired)
    return out


def make_evaluator(
    config: Any,
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
        max_steps=config.env.max_steps,
        ops=MaskOpsConfig.from_dict(dict(config.mask_ops)),
        examples_dir=examples_dir,
    )
