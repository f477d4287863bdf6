"""The learners a reviewer compares RL with: same observation, same training images, no ground
truth at test time.

- ``bandit_prompt``: a linear contextual bandit (disjoint LinUCB) over the prompt env's
  observation at reset, trained online with as many interactions as PPO gets env steps (one
  decision per image, rewarded as the env rewards it; :class:`PromptOutcomes`).
- ``supervised_prompt``: a ridge regression from that observation to every prompt's Dice,
  fitted on the training images; it picks the prompt with the highest predicted Dice.
- ``supervised_ops``: the same over every post-processing op sequence up to the episode length
  (:mod:`envs.op_tree`), from the post-processing env's observation at reset.
- ``best_fixed_ops``: the one op sequence with the best mean Dice on the training images.

Ground truth is used only to make training targets and rewards on the training images; a
fitted learner maps an observation (image + current mask features) to a choice. Everything
here is numpy and deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.environments import PromptSelectionEnv
from envs.mask_ops import MaskOpsConfig, MaskState
from envs.normalisation import ObservationStats
from envs.op_tree import OpSequence, all_sequences, sequence_states
from envs.sample import Sample
from envs.segmentation_env import SegmentationEnv
from models.metrics import mask_metrics
from models.segmentation import Segmenter

RIDGE = 1.0
"""L2 penalty of the ridge regressions and of the bandit's per-arm models (standardised
features, so one value suits every feature)."""
BANDIT_ALPHA = 0.05
"""LinUCB's exploration width, in reward units (Dice change): a bonus of about the spread of
prompt gains, so every prompt is tried early and exploration fades as evidence grows."""


def reset_observations(env: SegmentationEnv, samples: Sequence[Sample]) -> np.ndarray:
    """``(n, dim)``: the env's observation at reset on every sample, in order."""
    return np.stack([env.reset(options={"image_id": s.id})[0] for s in samples])


def _design(x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))]


@dataclass(frozen=True, eq=False)
class LinearPicker:
    """Ridge regression from standardised observations to each choice's value; picks the
    argmax (ties: the earlier choice)."""

    stats: ObservationStats
    weights: np.ndarray
    """``(dim + 1, n_choices)``, the last row the intercept."""

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> LinearPicker:
        """Fit on observations ``x`` ``(n, dim)`` and values ``y`` ``(n, n_choices)``."""
        stats = ObservationStats.from_observations(x)
        a = _design(stats.apply(x).astype(np.float64))
        penalty = ridge * np.eye(a.shape[1])
        penalty[-1, -1] = 0.0  # the intercept is not shrunk
        weights = np.linalg.solve(a.T @ a + penalty, a.T @ np.asarray(y, np.float64))
        return cls(stats, weights)

    def values(self, observations: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(self.stats.apply(observations)).astype(np.float64)
        return _design(x) @ self.weights

    def pick(self, observation: np.ndarray) -> int:
        return int(np.argmax(self.values(observation)[0]))


class LinUCB:
    """Disjoint LinUCB: one ridge model per arm over standardised context + intercept."""

    def __init__(
        self,
        n_arms: int,
        stats: ObservationStats,
        alpha: float = BANDIT_ALPHA,
        ridge: float = RIDGE,
    ) -> None:
        dim = stats.dim + 1
        self.stats = stats
        self.alpha = alpha
        self.a_inv = np.stack([np.eye(dim) / ridge for _ in range(n_arms)])
        self.b = np.zeros((n_arms, dim))
        self.pulls = np.zeros(n_arms, dtype=np.int64)

    def _context(self, observation: np.ndarray) -> np.ndarray:
        return np.append(self.stats.apply(observation).astype(np.float64), 1.0)

    def choose(self, observation: np.ndarray) -> int:
        """The arm with the highest upper confidence bound (ties: the earlier arm)."""
        x = self._context(observation)
        theta = np.einsum("kij,kj->ki", self.a_inv, self.b)
        width = np.sqrt(np.einsum("i,kij,j->k", x, self.a_inv, x))
        return int(np.argmax(theta @ x + self.alpha * width))

    def update(self, observation: np.ndarray, arm: int, reward: float) -> None:
        x = self._context(observation)
        a_inv = self.a_inv[arm]
        ax = a_inv @ x
        self.a_inv[arm] = a_inv - np.outer(ax, ax) / (1.0 + x @ ax)  # Sherman-Morrison
        self.b[arm] += reward * x
        self.pulls[arm] += 1

    def greedy(self, observation: np.ndarray) -> int:
        """The arm with the highest estimated reward (what evaluation uses)."""
        theta = np.einsum("kij,kj->ki", self.a_inv, self.b)
        return int(np.argmax(theta @ self._context(observation)))


@dataclass(frozen=True)
class PromptOutcomes:
    """What the one-step prompt env answers on every training image, computed once: the
    observation at reset, and per prompt the objective (the env's reward is its change from the
    default prompt's) and the ground-truth Dice. The env is deterministic per (image, prompt),
    so a learner reading these interacts with exactly the env PPO trains in."""

    observations: np.ndarray
    """``(n_images, dim)``."""
    objective: np.ndarray
    """``(n_images, n_prompts)``."""
    dice: np.ndarray
    """``(n_images, n_prompts)``."""
    default_index: int

    @property
    def rewards(self) -> np.ndarray:
        """``(n_images, n_prompts)``: the env's one-step reward of each prompt."""
        return self.objective - self.objective[:, [self.default_index]]


def prompt_outcomes(env: PromptSelectionEnv, samples: Sequence[Sample]) -> PromptOutcomes:
    """:class:`PromptOutcomes` of ``env`` (one decision per image) on ``samples``."""
    if env.max_steps != 1:
        raise ValueError(
            f"the prompt learners make one decision per image; env has {env.max_steps}"
        )
    objective, dice = [], []
    for s in samples:
        assert s.mask is not None
        masks = [env.segmenter.segment(s.image, p).mask for p in env.prompts]
        objective.append([env.objective.evaluate(s, m).value for m in masks])
        dice.append([mask_metrics(m, s.mask).dice for m in masks])
    return PromptOutcomes(
        reset_observations(env, samples),
        np.array(objective),
        np.array(dice),
        env.prompts.index(env.default_prompt),
    )


def train_bandit(outcomes: PromptOutcomes, interactions: int, seed: int) -> LinUCB:
    """LinUCB trained online for ``interactions`` decisions, each on a training image drawn
    uniformly (seeded by ``seed``), rewarded as the env rewards that prompt; the context is
    standardised with the training images' observation statistics."""
    stats = ObservationStats.from_observations(outcomes.observations)
    rewards = outcomes.rewards
    bandit = LinUCB(rewards.shape[1], stats)
    rng = np.random.default_rng(seed)
    for image in rng.integers(len(rewards), size=interactions):
        obs = outcomes.observations[image]
        arm = bandit.choose(obs)
        bandit.update(obs, arm, float(rewards[image, arm]))
    return bandit


@dataclass(frozen=True)
class SequenceTable:
    """Every op sequence up to a depth and its Dice on every training image."""

    sequences: list[OpSequence]
    dice: np.ndarray
    """``(n_images, n_sequences)``."""

    @property
    def best_fixed(self) -> OpSequence:
        """The sequence with the best mean Dice (ties: the first in the fixed order)."""
        return self.sequences[int(np.argmax(self.dice.mean(axis=0)))]


def sequence_table(
    samples: Sequence[Sample],
    segmenter: Segmenter,
    base_prompt: str,
    ops: MaskOpsConfig,
    depth: int,
) -> SequenceTable:
    """Dice of every sequence of :func:`envs.op_tree.all_sequences` from each sample's
    ``base_prompt`` mask."""
    rows = []
    for s in samples:
        assert s.mask is not None
        start = MaskState.from_segmentation(segmenter.segment(s.image, base_prompt))
        rows.append(
            [mask_metrics(st.mask, s.mask).dice for st in sequence_states(start, ops, depth)]
        )
    return SequenceTable(all_sequences(ops, depth), np.array(rows))
