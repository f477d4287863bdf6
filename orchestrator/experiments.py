"""The experiments as Tune trials: what each trial is, and how its environment is built.

Three experiments, four trials (experiment 3 has two steps):

=============  =================  =====================================================
trial          experiment         what it does
=============  =================  =====================================================
prompt         1 prompt           PPO over PromptSelection-v0 (reward: change of GT Dice)
postprocess    2 post-processing  PPO over PostProcess-v0 (reward: change of GT Dice)
reward_net     3 step 1           supervised training of the reward network
reward_guided  3 step 2           PPO over RewardGuidedPrompt-v0 (reward: change of the
                                  reward network's score), starts once step 1's checkpoint
                                  exists
=============  =================  =====================================================

The PPO trials are symmetrical: same algorithm config, same loop, same metrics; they differ
only in the environment class and its keywords (:func:`env_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.environments import PostProcessEnv, PromptSelectionEnv, RewardGuidedPromptEnv
from envs.segmentation_env import SegmentationEnv
from orchestrator.config import RunConfig

PPO_TRIALS: dict[str, type[SegmentationEnv]] = {
    "prompt": PromptSelectionEnv,
    "postprocess": PostProcessEnv,
    "reward_guided": RewardGuidedPromptEnv,
}
TRIALS_OF_EXPERIMENT = {
    "prompt": ("prompt",),
    "postprocess": ("postprocess",),
    "reward": ("reward_net", "reward_guided"),
}
TUNE_EXPERIMENT = "tune"
"""Name of the Tune experiment; its directory is ``<run dir>/tune``."""
ENV_NAME = "sa2va_rl_experiment"
"""The one name registered with Tune; ``env_config["trial"]`` picks the class."""


@dataclass(frozen=True)
class RunPaths:
    """Where everything of one run lives (all under ``root``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def synthetic_data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.root / "split_manifest.json"

    @property
    def tune_dir(self) -> Path:
        return self.root / TUNE_EXPERIMENT

    @property
    def reward_net(self) -> Path:
        return self.root / "reward_net" / "best_reward_net.pt"

    @property
    def reward_net_report(self) -> Path:
        return self.root / "reward_net" / "report.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def trials_for(config: RunConfig) -> list[str]:
    """The trials a config asks for, in launch order (reward_net before reward_guided)."""
    return [trial for exp in config.experiments for trial in TRIALS_OF_EXPERIMENT[exp]]


def env_kwargs(
    trial: str,
    config: RunConfig,
    data: dict[str, Any],
    *,
    reward_net: str | None = None,
    backend_id: str | None = None,
    manifest_hash: str | None = None,
) -> dict[str, Any]:
    """Keywords of the trial's environment class, without the segmenter (added in-process).

    ``data`` holds the data keywords: ``{"data", "manifest", "split", "max_images"}`` in a
    trial, or ``{"samples": [...]}`` in evaluation.
    """
    env = config.env
    common: dict[str, Any] = {
        **data,
        "max_steps": env.max_steps,
        "recall_weight": env.recall_weight,
    }
    if trial == "postprocess":
        return {**common, "base_prompt": env.default_prompt, "mask_ops": dict(config.mask_ops)}
    prompts = {"prompts": list(env.prompts), "default_prompt": env.default_prompt}
    if trial == "prompt":
        return {**common, **prompts}
    if trial == "reward_guided":
        return {
            **common,
            **prompts,
            "reward_net": reward_net,
            "expected_backend_id": backend_id,
            "expected_manifest_hash": manifest_hash,
        }
    raise ValueError(f"trial {trial!r} has no environment")


def make_env(env_config: dict[str, Any]) -> SegmentationEnv:
    """Env creator registered with Tune: ``{"trial", "kwargs", "segmenter"}`` -> env."""
    cls = PPO_TRIALS[env_config["trial"]]
    env: SegmentationEnv = cls(segmenter=env_config["segmenter"], **env_config["kwargs"])
    return env
