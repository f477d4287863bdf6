"""The baselines a reviewer compares RL with, fitted on the training images: a contextual
bandit over prompts, ridge pickers for prompts and op sequences, the best fixed op sequence
(see :mod:`.baselines`). They need no trained policy, so the run fits and evaluates them while
the trials train (:mod:`.references`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envs.mask_ops import MaskOpsConfig
from envs.sample import Sample
from models.segmentation import Segmenter
from orchestrator.config import RunConfig
from orchestrator.evaluation.baselines import (
    LinearPicker,
    LinUCB,
    SequenceTable,
    prompt_outcomes,
    reset_observations,
    sequence_table,
    train_bandit,
)
from orchestrator.evaluation.methods import Evaluator
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.experiments import POSTPROCESS, PROMPT, build_env

LEARNER_METHODS = ("bandit_prompt", "supervised_prompt", "supervised_ops", "best_fixed_ops")


@dataclass(frozen=True)
class Learners:
    """The baselines fitted on the training images (see :mod:`.baselines`)."""

    bandit: LinUCB
    prompt_picker: LinearPicker
    ops_picker: LinearPicker
    ops_table: SequenceTable


def fit_learners(config: RunConfig, train: Sequence[Sample], segmenter: Segmenter) -> Learners:
    """The bandit (``ppo.total_env_steps`` interactions, seeded by ``ppo.seed``), the ridge
    pickers and the op-sequence table, all on ``train``."""
    ppo, env = config.ppo, config.env
    outcomes = prompt_outcomes(_prompt_env(config, train, segmenter), train)
    bandit = train_bandit(outcomes, ppo.total_env_steps, seed=ppo.seed)
    prompt_picker = LinearPicker.fit(outcomes.observations, outcomes.dice)
    ops = MaskOpsConfig.from_dict(dict(config.mask_ops))
    depth = env.steps_for(POSTPROCESS.experiment)
    table = sequence_table(train, segmenter, env.default_prompt, ops, depth)
    post_env = build_env(POSTPROCESS, config, train, segmenter)
    ops_picker = LinearPicker.fit(reset_observations(post_env, train), table.dice)
    return Learners(bandit, prompt_picker, ops_picker, table)


def _prompt_env(config: RunConfig, samples: Sequence[Sample], segmenter: Segmenter) -> Any:
    """The prompt env with one decision per image: what the prompt learners choose in."""
    one_step = config.model_copy(
        update={"env": config.env.model_copy(update={"episode_steps": {"prompt": 1}})}
    )
    return build_env(PROMPT, one_step, samples, segmenter)


def learner_steps(
    learners: Learners,
    config: RunConfig,
    evaluator: Evaluator,
    segmenter: Segmenter,
) -> list[tuple[str, Callable[[], list[ImageResult]]]]:
    """The four fitted learners on the evaluator's images, as (method, compute) steps. They
    need no trained policy: a caller may run them before or while the trials train."""
    samples = list(evaluator.test)
    prompt_env = _prompt_env(config, samples, segmenter)
    post_env = build_env(POSTPROCESS, config, samples, segmenter)
    table, ops_pick = learners.ops_table, learners.ops_picker.pick
    return [
        (
            "bandit_prompt",
            functools.partial(
                evaluator.policy, "bandit_prompt", prompt_env, learners.bandit.greedy
            ),
        ),
        (
            "supervised_prompt",
            functools.partial(
                evaluator.policy, "supervised_prompt", prompt_env, learners.prompt_picker.pick
            ),
        ),
        (
            "supervised_ops",
            functools.partial(
                evaluator.sequences,
                "supervised_ops",
                post_env,
                lambda obs: table.sequences[ops_pick(obs)],
            ),
        ),
        (
            "best_fixed_ops",
            functools.partial(
                evaluator.sequences, "best_fixed_ops", post_env, lambda _: table.best_fixed
            ),
        ),
    ]
