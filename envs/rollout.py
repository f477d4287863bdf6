"""Running a policy greedily through one episode of an environment (evaluation, hand-offs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from envs.mask_ops import MaskState
from envs.segmentation_env import SegmentationEnv

Policy = Callable[[np.ndarray], int]
"""Observation -> action index."""


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


def final_prompts(env: SegmentationEnv, policy: Policy, image_ids: Sequence[str]) -> dict[str, str]:
    """Image id -> the prompt a prompt policy ends its episode on (``env``: a prompt env)."""
    return {image_id: run_policy(env, policy, image_id)[1][-1] for image_id in image_ids}
