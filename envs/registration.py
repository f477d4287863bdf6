"""gymnasium ids of the three experiments (registered when :mod:`envs` is imported)."""

from __future__ import annotations

import gymnasium as gym

PROMPT_SELECTION = "sa2va_rl/PromptSelection-v0"
POST_PROCESS = "sa2va_rl/PostProcess-v0"
REWARD_GUIDED_PROMPT = "sa2va_rl/RewardGuidedPrompt-v0"

ENTRY_POINTS = {
    PROMPT_SELECTION: "envs.defaults:prompt_selection",
    POST_PROCESS: "envs.defaults:post_process",
    REWARD_GUIDED_PROMPT: "envs.defaults:reward_guided_prompt",
}
"""The factories of :mod:`envs.defaults`: ``gymnasium.make(id)`` works with no arguments."""


def register_envs() -> None:
    """Register the ids once (idempotent). Env classes are imported lazily by gymnasium."""
    for env_id, entry_point in ENTRY_POINTS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=False)
