"""The three experiments as gymnasium environments.

- :class:`PromptSelectionEnv` (experiment 1): each action picks one of the candidate prompts;
  the mask becomes that prompt's segmentation. Reward: change of ground-truth Dice.
- :class:`PostProcessEnv` (experiment 2): each action applies one mask operation (or stops) to
  the base prompt's mask. Reward: change of ground-truth Dice.
- :class:`RewardGuidedPromptEnv` (experiment 3): experiment 1's actions, but the reward is the
  change of the reward network's score: no ground truth needed.

All take their ``samples``, ``segmenter`` and (experiment 3) reward scorer injected; none loads
data or a model itself. The no-argument ``gymnasium.make()`` defaults (a small built-in
synthetic set, a local Frangi backend, a built-in reward net) live in :mod:`envs.defaults`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op, op_available
from envs.objectives import GroundTruthObjective, Objective, RewardNetObjective
from envs.sample import Sample
from envs.segmentation_env import SegmentationEnv
from models.errors import UserError
from models.prompts import CANDIDATE_PROMPTS, DEFAULT_PROMPT
from models.reward_net import MaskScorer
from models.segmentation import Segmenter


def _check_prompts(prompts: Sequence[str], default_prompt: str) -> tuple[str, ...]:
    prompts = tuple(prompts)
    if len(prompts) < 2:
        raise UserError(f"prompts must list at least 2 candidates, got {list(prompts)}")
    if default_prompt not in prompts:
        raise UserError(f"default_prompt {default_prompt!r} must be one of prompts {prompts}")
    return prompts


def prompt_state(segmenter: Segmenter, sample: Sample, prompt: str) -> MaskState:
    """The (deferred) state of ``prompt``'s segmentation of ``sample``: the segmenter is asked
    only when the mask is first needed, which a revisit the env has memoised never does."""

    def segment() -> MaskState:
        return MaskState.from_segmentation(segmenter.segment(sample.image, prompt), prompt=prompt)

    return MaskState.deferred((prompt,), segment)


class PromptSelectionEnv(SegmentationEnv):
    """Experiment 1: pick a prompt per step; start from the default prompt's mask.

    ``info`` adds ``prompt`` (the text chosen).
    """

    def __init__(
        self,
        *,
        samples: Sequence[Sample],
        segmenter: Segmenter,
        max_steps: int = 3,
        prompts: Sequence[str] = CANDIDATE_PROMPTS,
        default_prompt: str = DEFAULT_PROMPT,
        recall_weight: float = 0.0,
        objective: Objective | None = None,
    ) -> None:
        self.prompts = _check_prompts(prompts, default_prompt)
        self.default_prompt = default_prompt
        objective = objective or GroundTruthObjective(recall_weight)
        super().__init__(
            samples=samples,
            segmenter=segmenter,
            objective=objective,
            action_names=self.prompts,
            max_steps=max_steps,
        )

    def _initial_state(self, sample: Sample, options: dict[str, Any]) -> MaskState:
        return prompt_state(self.segmenter, sample, self.default_prompt)

    def _transition(self, action: int) -> tuple[MaskState, bool, dict[str, Any]]:
        prompt = self.prompts[action]
        return prompt_state(self.segmenter, self.sample, prompt), False, {"prompt": prompt}


class RewardGuidedPromptEnv(PromptSelectionEnv):
    """Experiment 3, step 2: experiment 1's actions, rewarded by the reward network's score.

    ``reward_net`` scores masks (:class:`~models.reward_net.MaskScorer`: a loaded
    :class:`~models.reward_net.RewardScorer`, or the orchestrator's stand-in that loads the run's
    checkpoint on first use and checks that it was made for this backend and split). Images
    without ground truth are fine; where ground truth exists it is only reported in ``info``.
    """

    def __init__(
        self,
        *,
        reward_net: MaskScorer,
        recall_weight: float = 0.0,
        **prompt_env_kwargs: Any,
    ) -> None:
        """``prompt_env_kwargs``: the samples, segmenter, prompt and episode keywords of
        :class:`PromptSelectionEnv`."""
        super().__init__(
            objective=RewardNetObjective(reward_net, recall_weight),
            **prompt_env_kwargs,
        )


class PostProcessEnv(SegmentationEnv):
    """Experiment 2: apply mask operations (see :mod:`envs.mask_ops`) to the base prompt's mask;
    the ``stop`` action ends the episode early.

    ``base_prompts`` (image id -> prompt) starts an image's episodes from that prompt's mask
    instead (the combined trial trains on the prompt policy's choices), and
    ``reset(options={"base_prompt": ...})`` from the named prompt's. ``info`` adds ``op`` and
    ``op_available`` (False for a threshold op without a soft mask: it changed nothing).
    """

    def __init__(
        self,
        *,
        samples: Sequence[Sample],
        segmenter: Segmenter,
        max_steps: int = 3,
        base_prompt: str = DEFAULT_PROMPT,
        recall_weight: float = 0.0,
        mask_ops: MaskOpsConfig | dict[str, Any] | None = None,
        base_prompts: Mapping[str, str] | None = None,
    ) -> None:
        if mask_ops is None:
            mask_ops = MaskOpsConfig()
        elif isinstance(mask_ops, dict):
            mask_ops = MaskOpsConfig.from_dict(mask_ops)
        self.ops_config = mask_ops
        self.base_prompt = base_prompt
        self.base_prompts = dict(base_prompts or {})
        super().__init__(
            samples=samples,
            segmenter=segmenter,
            objective=GroundTruthObjective(recall_weight),
            action_names=mask_ops.ops,
            max_steps=max_steps,
        )

    def _initial_state(self, sample: Sample, options: dict[str, Any]) -> MaskState:
        prompt = self.base_prompts.get(sample.id, self.base_prompt)
        return prompt_state(self.segmenter, sample, options.get("base_prompt", prompt))

    def _transition(self, action: int) -> tuple[MaskState, bool, dict[str, Any]]:
        name = self.ops_config.ops[action]
        info = {"op": name, "op_available": op_available(name, self.state)}
        if name == "stop":
            return self.state, True, info
        return apply_op(name, self.state, self.ops_config), False, info
