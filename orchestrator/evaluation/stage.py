"""The run's evaluation stage: every method on the test split, same images for every method.

Writes ``eval/per_image.csv`` and the example masks ``eval/examples/*.png`` (every method's
final mask of the worst, median and best baseline image), and ``eval/train_per_image.csv``: the
same learned methods on their training images, so over-fitting and the action histograms on
train vs test show; the report is built from those files.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envs.mask_ops import MaskOpsConfig
from envs.sample import Sample
from envs.sources import load_split
from models.reward_net import RewardScorer, load_checkpoint
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
from orchestrator.evaluation.methods import (
    Evaluator,
    Policy,
    best_fixed_prompt,
    make_evaluator,
)
from orchestrator.evaluation.per_image import ImageResult, write_rows
from orchestrator.evaluation.references import (
    ReferenceResults,
    evaluate_references,
)
from orchestrator.experiments import (
    COMBINED_METHOD,
    COMBINED_OF,
    POSTPROCESS,
    PROMPT,
    TrialOutcome,
    build_env,
    trial,
)
from orchestrator.run_dir import BEST_POLICY_FILE, RunPaths

if TYPE_CHECKING:
    from orchestrator.data import PreparedData
    from orchestrator.inference.client import SegmentationClient


def best_policy_paths(outcomes: Iterable[TrialOutcome]) -> dict[str, Path]:
    """Trial -> ``best_policy.pt`` of its latest checkpoint, for PPO trials that have one."""
    found = {}
    for outcome in outcomes:
        if trial(outcome.name).is_ppo and outcome.checkpoint is not None:
            path = outcome.checkpoint / BEST_POLICY_FILE
            if path.is_file():
                found[outcome.name] = path
    return found


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


def evaluate_run(
    config: RunConfig,
    paths: RunPaths,
    prepared: PreparedData,
    segmenter: SegmentationClient,
    policy_files: dict[str, Path],
    references: ReferenceResults | None = None,
) -> list[ImageResult]:
    """Every method on the test split, and the learned ones on the training images too;
    writes ``eval/per_image.csv``, ``eval/train_per_image.csv`` and the example masks.
    ``policy_files``: PPO trial -> its exported best policy (see :func:`best_policy_paths`).
    ``references``: the policy-free methods if already evaluated (the run computes them while
    the trials train, :mod:`orchestrator.evaluation.references`); computed here otherwise."""
    from orchestrator.training.ppo import ExportedPolicy

    during = "" if references is None else " (while the trials trained)"
    if references is None:
        references = evaluate_references(config, paths, prepared, segmenter)
    test = load_split(prepared.ref, "test", config.data.max_eval_images)
    train = load_split(prepared.ref, "train", config.data.max_train_images)
    test_evaluator = make_evaluator(config, test, segmenter, examples_dir=paths.examples_dir)
    # The baseline (computed with the references) picked the example images.
    test_evaluator.keep_ids = references.keep_ids
    policies: dict[str, Policy] = {t: ExportedPolicy.load(p).act for t, p in policy_files.items()}
    start = time.monotonic()
    learners = fit_learners(config, train, segmenter)
    print(
        f"  {'learners fitted':20s} {len(train)} train images in {time.monotonic() - start:.1f} s",
        flush=True,
    )
    fixed = best_fixed_prompt(train, segmenter, config.env.prompts)
    scorer = None
    if any(trial(name).needs_reward_net for name in policies):
        scorer = load_checkpoint(
            paths.reward_net,
            backend_id=segmenter.backend_id,
            manifest_hash=prepared.manifest_hash,
        )
    setup = _Setup(config, segmenter, policies, learners, fixed, scorer)
    rows = _evaluate_split(setup, "test", test_evaluator, references, during)
    write_rows(paths.per_image_csv, rows)
    train_rows = _evaluate_split(setup, "train", make_evaluator(config, train, segmenter))
    write_rows(paths.train_per_image_csv, train_rows)
    return rows


@dataclass(frozen=True)
class _Setup:
    config: RunConfig
    segmenter: Segmenter
    policies: dict[str, Policy]
    learners: Learners
    fixed_prompt: str
    scorer: RewardScorer | None


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


def _evaluate_split(
    setup: _Setup,
    split: str,
    evaluator: Evaluator,
    references: ReferenceResults | None = None,
    during: str = "",
) -> list[ImageResult]:
    """The methods on the evaluator's images (``split``); the oracles on the test split only.
    Methods in ``references`` (test split) take its rows instead of being computed again."""
    samples = list(evaluator.test)
    config, segmenter, policies = setup.config, setup.segmenter, setup.policies
    envs = {t: build_env(trial(t), config, samples, segmenter, setup.scorer) for t in policies}
    # The baseline goes first: it picks the example images the later methods save masks of.
    steps: list[tuple[str, Callable[[], list[ImageResult]]]] = [
        ("baseline", evaluator.baseline),
        (
            "best_fixed_prompt",
            functools.partial(evaluator.fixed_prompt, "best_fixed_prompt", setup.fixed_prompt),
        ),
        *learner_steps(setup.learners, config, evaluator, segmenter),
    ]
    for t, policy in policies.items():
        method = trial(t).method
        assert method is not None, "a PPO trial has an evaluation method"
        steps.append((method, functools.partial(evaluator.policy, method, envs[t], policy)))
    first, then = (t.name for t in COMBINED_OF)
    if first in policies and then in policies:
        combined = functools.partial(
            evaluator.combined, envs[first], policies[first], envs[then], policies[then]
        )
        steps.append((COMBINED_METHOD, combined))
    if split == "test":
        steps += [
            ("oracle_prompt", evaluator.oracle_prompt),
            ("oracle_postprocess", evaluator.oracle_postprocess),
        ]
    done = {} if references is None else references.rows
    seconds = {} if references is None else references.seconds
    rows: list[ImageResult] = []
    for method, compute in steps:
        if method in done:
            rows += done[method]
            elapsed, when = seconds[method], during
        else:
            start = time.monotonic()
            rows += compute()
            elapsed, when = time.monotonic() - start, ""
        print(f"  {method:20s} {len(samples)} {split} images in {elapsed:.1f} s{when}", flush=True)
    return rows
