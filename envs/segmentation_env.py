"""The episode loop shared by the three environments.

An episode works on one image for up to ``max_steps`` actions. The base class owns the loop:
picking the image, scoring the mask with the :mod:`objective <envs.objectives>`, rewards as the
objective's change, observations, ``info``. A subclass says only where an episode starts
(``_initial_state``) and what an action does (``_transition``).

Observations are computed from the image and the current mask only (see :mod:`envs.features`),
plus the current soft-mask threshold and a one-hot of the previous action (none at reset).
Ground truth reaches the reward and ``info``, never the observation. The image's features are
computed once per image; a state's mask features and objective once per state (image and
``MaskState.origin``: the prompt and the ops since), because episodes revisit the same few
states of each image over and over and both are functions of the state alone.

``info`` after every ``reset``/``step``: ``image_id``, ``objective``, ``best_reward`` (best
objective so far in the episode), ``action`` (name of the action taken, ``"reset"`` at reset),
``gt_dice``/``gt_recall``/``gt_precision`` when the image has ground truth, ``reward_net_score``
when the objective is the reward network, plus what the subclass adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np

from envs import features
from envs.mask_ops import MaskState
from envs.objectives import Evaluation, Objective
from envs.sample import Sample
from models.errors import UserError
from models.segmentation import Segmenter

MAX_MEMO_STATES = 200_000
"""States whose mask features and objective one environment keeps (a few hundred bytes each);
beyond that, new states are computed every time they come up."""

_T = TypeVar("_T")


def observation_space(n_actions: int) -> gym.spaces.Box:
    """:func:`envs.features.observation_space`, then the current threshold on the soft mask
    (post-processing moves it; 0.5 otherwise), then a one-hot of the previous action."""
    base = features.observation_space()
    low = np.concatenate([base.low, np.zeros(1 + n_actions, np.float32)])
    high = np.concatenate([base.high, np.ones(1 + n_actions, np.float32)])
    return gym.spaces.Box(low=low, high=high, dtype=np.float32)


class SegmentationEnv(gym.Env[np.ndarray, np.int64]):
    """Base class: one image per episode, a discrete action set, reward = objective change.

    Args:
        samples: the images episodes draw from (uniformly, with the env's seeded RNG).
        segmenter: anything with the segmenter protocol (a local backend or the Ray client).
        objective: what the episode improves (ground truth or reward network).
        action_names: one name per discrete action, reported in ``info["action"]``.
        max_steps: actions per episode at most.

    ``reset(options={"image_id": ...})`` or ``options={"index": i}`` picks a given image
    (evaluation walks the test split this way).
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's own declaration)

    def __init__(
        self,
        samples: Sequence[Sample],
        segmenter: Segmenter,
        objective: Objective,
        action_names: Sequence[str],
        max_steps: int = 3,
    ) -> None:
        if not samples:
            raise UserError("the environment got no images: check the data path and split")
        if max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {max_steps}")
        if objective.needs_ground_truth and any(s.mask is None for s in samples):
            missing = next(s.id for s in samples if s.mask is None)
            raise UserError(
                f"image {missing} has no ground-truth mask, but this environment's reward needs "
                "one; use RewardGuidedPrompt-v0 for unlabelled data"
            )
        self.samples = list(samples)
        self._index = {s.id: i for i, s in enumerate(self.samples)}
        self.segmenter = segmenter
        self.objective = objective
        self.action_names = tuple(action_names)
        self.max_steps = max_steps
        self.action_space = gym.spaces.Discrete(len(self.action_names))
        self.observation_space = observation_space(len(self.action_names))
        self._image_features: dict[str, np.ndarray] = {}
        self._memo: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        self._sample: Sample | None = None
        self._state: MaskState | None = None

    # --- what subclasses fill in -------------------------------------------------------------
    def _initial_state(self, sample: Sample, options: dict[str, Any]) -> MaskState:
        """The mask an episode on ``sample`` starts from (``options`` are reset's)."""
        raise NotImplementedError

    def _transition(self, action: int) -> tuple[MaskState, bool, dict[str, Any]]:
        """Apply ``action`` to ``self.state``: new state, whether the episode ends (stop), extra
        ``info``."""
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------
    @property
    def sample(self) -> Sample:
        if self._sample is None:
            raise RuntimeError("call reset() before step()")
        return self._sample

    @property
    def state(self) -> MaskState:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        return self._state

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        self._sample = self.samples[self._pick(options)]
        self._state = self._initial_state(self._sample, options)
        self._steps = 0
        self._last_action: int | None = None
        evaluation = self._evaluate(self._sample, self._state)
        self._value = self._best = evaluation.value
        return self._observation(), self._info("reset", evaluation.info)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        index = int(action)
        self._state, stopped, extra = self._transition(index)
        self._steps += 1
        self._last_action = index
        evaluation = self._evaluate(self.sample, self._state)
        reward = evaluation.value - self._value
        self._value = evaluation.value
        self._best = max(self._best, evaluation.value)
        # The horizon is part of the task (progress is observed), so reaching it terminates.
        terminated = stopped or self._steps >= self.max_steps
        info = self._info(self.action_names[index], {**evaluation.info, **extra})
        return self._observation(), float(reward), terminated, False, info

    def _pick(self, options: dict[str, Any]) -> int:
        if "image_id" in options:
            image_id = options["image_id"]
            if image_id not in self._index:
                raise KeyError(f"image {image_id!r} is not among this environment's images")
            return self._index[image_id]
        if "index" in options:
            return int(options["index"]) % len(self.samples)
        return int(self.np_random.integers(len(self.samples)))

    def _observation(self) -> np.ndarray:
        sample, state = self.sample, self.state
        if sample.id not in self._image_features:
            self._image_features[sample.id] = features.image_features(sample.image)
        base = features.observation(
            sample.image,
            None,  # the memoised mask features stand in for the mask
            None,
            self._steps,
            self.max_steps,
            image_feats=self._image_features[sample.id],
            mask_feats=self._state_features(sample, state),
        )
        last = np.zeros(len(self.action_names), dtype=np.float32)
        if self._last_action is not None:
            last[self._last_action] = 1.0
        threshold = np.array([state.threshold], dtype=np.float32)
        return np.concatenate([base, threshold, last])

    def _state_features(self, sample: Sample, state: MaskState) -> np.ndarray:
        """``features.mask_features`` of ``state`` (memoised, see :meth:`_memoised`)."""
        return self._memoised(
            "features", sample, state, lambda: features.mask_features(state.mask, state.prob)
        )

    def _evaluate(self, sample: Sample, state: MaskState) -> Evaluation:
        """The objective of ``state`` (memoised, see :meth:`_memoised`)."""
        return self._memoised(
            "objective", sample, state, lambda: self.objective.evaluate(sample, state.mask)
        )

    def _memoised(
        self, kind: str, sample: Sample, state: MaskState, compute: Callable[[], _T]
    ) -> _T:
        """``compute()``, kept per (``kind``, image, ``state.origin``) when the state knows its
        origin (up to :data:`MAX_MEMO_STATES` entries)."""
        if state.origin is None:
            return compute()
        key = (kind, sample.id, state.origin)
        if key in self._memo:
            return self._memo[key]
        value = compute()
        if len(self._memo) < MAX_MEMO_STATES:
            self._memo[key] = value
        return value

    def _info(self, action: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "image_id": self.sample.id,
            "action": action,
            "objective": self._value,
            "best_reward": self._best,
            "step": self._steps,
            **extra,
        }
