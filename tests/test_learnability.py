"""Can the project's PPO learn a per-image choice at all? A task where the answer is known.

Four uniform grey images, two at grey 127 and two at 128 (one pixel differs within a pair, so
they are distinct images). A fixture segmenter answers three prompts: ``a`` (the default) gives
a mask of Dice 0.667 on every image; ``b`` gives the exact ground truth on the darker images and
a Dice-0.4 mask on the brighter ones; ``c`` the reverse. So the best prompt is ``b`` on the
darker and ``c`` on the brighter images (mean Dice 1.0), while a policy that ignores the image
picks one prompt everywhere (mean Dice 0.7 at best).

The only thing telling the images apart is a 1/255 shift of the intensity features (mean and
percentiles): exactly the situation of the real observation, whose features barely vary at
their raw scale. With the fixed standardisation (``ppo.normalize_observations``, the default)
the quick config's PPO picks the right prompt on every image within 1,024 env steps; with raw
observations the same PPO, seed and budget does not: the test asserts both, so it proves it
can fail. The chain is the trial's: ``fit_stats`` -> ``make_env`` behind the normalisation ->
``build_ppo_config`` -> ``export_policy`` with the stats -> ``ExportedPolicy`` on raw
observations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.tune.registry import register_env

from envs.environments import PromptSelectionEnv
from envs.normalisation import fit_stats
from envs.sample import Sample
from models.segmentation import Segmentation
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.experiments import behind_normalisation
from orchestrator.training.local_ppo import LocalPPO
from orchestrator.training.ppo import ExportedPolicy, build_ppo_config, export_policy

SIDE = 24
PROMPTS = ("a", "b", "c")
BUDGET = 1024
EXPECTED = {"dark-0": "b", "dark-1": "b", "bright-0": "c", "bright-1": "c"}


def _square(top: int, left: int, size: int = 8) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[top : top + size, left : left + size] = True
    return mask


GT = _square(8, 8)
HALF = _square(8, 8) & _square(8, 12)  # 8x4 inside the truth: Dice 2*32/(64+32) = 0.667
WRONG = _square(8, 8, 8) & _square(14, 8)  # 2x8 inside the truth: Dice 2*16/(64+16) = 0.4


def _samples() -> list[Sample]:
    samples = []
    for name, grey in (("dark", 127), ("bright", 128)):
        for i in range(2):
            image = np.full((SIDE, SIDE, 3), grey, np.uint8)
            image[0, 0] = grey + (1 if i else 0) * (1 if name == "dark" else -1)
            samples.append(Sample(f"{name}-{i}", name, image, GT))
    return samples


class ChoiceSegmenter:
    """``b`` is right on the darker images, ``c`` on the brighter ones, ``a`` half right."""

    backend_id = "fixture:learnability"

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        dark = float(image[1:, 1:].mean()) < 127.5
        right = GT if (prompt == "b") == dark else WRONG
        mask = HALF if prompt == "a" else right
        return Segmentation(mask=mask.copy(), prob=None)


ENV_NAME = "learnability_fixture"


def _env() -> PromptSelectionEnv:
    # One decision per image: the project's prompt episode shape (env.episode_steps).
    return PromptSelectionEnv(
        samples=_samples(),
        segmenter=ChoiceSegmenter(),
        prompts=PROMPTS,
        default_prompt="a",
        max_steps=1,
    )


def _make_env(env_config: dict[str, Any]) -> Any:
    return behind_normalisation(_env(), env_config)


def _train_and_choose(normalise: bool, tmp_path: Path) -> dict[str, str]:
    config = load_config(
        CONFIG_DIR / "quick.yaml",
        {"ppo": {"total_env_steps": BUDGET, "normalize_observations": normalise}},
    )
    ppo = config.ppo
    assert config.env.steps_for("prompt") == _env().max_steps == 1
    env_config: dict[str, Any] = {}
    stats = None
    if ppo.normalize_observations:
        stats = fit_stats(_env(), ppo.normalization_steps, ppo.seed)
        env_config["obs_stats"] = stats.to_dict()
    register_env(ENV_NAME, _make_env)
    # The trial's PPO, in-process without Ray (what `sa2va-rl train --local` runs).
    algo = LocalPPO(build_ppo_config(ppo, ENV_NAME, env_config))
    try:
        steps = 0
        while steps < ppo.total_env_steps:
            steps = algo.train()["num_env_steps_sampled_lifetime"]
        path = export_policy(algo.get_module(), tmp_path / "policy.pt", {}, stats)
    finally:
        algo.stop()
    policy = ExportedPolicy.load(path)
    env = _env()  # raw observations: the policy normalises them itself
    choices = {}
    for sample_id in EXPECTED:
        obs, _ = env.reset(options={"image_id": sample_id})
        choices[sample_id] = PROMPTS[policy.act(obs)]
    return choices


def test_fixture_dice_values() -> None:
    from models.metrics import mask_metrics

    assert mask_metrics(HALF, GT).dice == pytest.approx(2 * 32 / 96)
    assert mask_metrics(WRONG, GT).dice == pytest.approx(2 * 16 / 80)


@pytest.mark.slow  # about 45 s of CPU per case: RLlib PPO for 1,024 env steps
@pytest.mark.parametrize("normalise", [True, False], ids=["normalised", "raw"])
def test_ppo_learns_the_per_image_prompt_only_with_normalisation(
    tmp_path: Path, normalise: bool
) -> None:
    choices = _train_and_choose(normalise, tmp_path)
    if normalise:
        assert choices == EXPECTED
    else:
        # Raw observations: the same PPO, seed and budget does not tell the images apart.
        assert choices != EXPECTED
