"""The run's evaluation stage: every method on the test split, same images for every method.

Writes ``eval/per_image.csv`` and the example masks ``eval/examples/*.png`` (every method's
final mask of the worst, median and best baseline image), ``eval/val_per_image.csv`` (every
method but the oracles on the val split, reported beside test) and ``eval/train_per_image.csv``:
the same learned methods on their training images, so over-fitting and the action histograms on
train vs test show; the report is built from those files. A trained method has one row per
image and training seed (``ImageResult.seed``): each instance's policy is evaluated;
``combined`` at seed k is the prompt policy of seed k, then the combined trial's of seed k.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envs.segmentation_env import SegmentationEnv
from envs.sources import load_split
from models.reward_net import RewardScorer, load_checkpoint
from models.segmentation import Segmenter
from orchestrator.config import RunConfig
from orchestrator.evaluation.learners import Learners, learner_steps
from orchestrator.evaluation.methods import (
    Evaluator,
    Policy,
    make_evaluator,
)
from orchestrator.evaluation.per_image import ImageResult, write_rows
from orchestrator.evaluation.references import (
    FIT_LEARNERS,
    ReferenceResults,
    evaluate_references,
)
from orchestrator.experiments import (
    TrialOutcome,
    build_env,
    instance_name,
    parse_instance,
    trial,
)
from orchestrator.run_dir import BEST_POLICY_FILE, RunPaths

if TYPE_CHECKING:
    from orchestrator.data import PreparedData
    from orchestrator.inference.client import SegmentationClient


def best_policy_paths(outcomes: Iterable[TrialOutcome]) -> dict[str, Path]:
    """Trial instance -> ``best_policy.pt`` of its latest checkpoint, for PPO trials that have
    one."""
    found = {}
    for outcome in outcomes:
        if trial(outcome.name).is_ppo and outcome.checkpoint is not None:
            path = outcome.checkpoint / BEST_POLICY_FILE
            if path.is_file():
                found[outcome.name] = path
    return found


def head_models(paths: RunPaths, outcomes: Iterable[TrialOutcome]) -> dict[str, Path]:
    """Fine-tuning trial -> its kept head's state file, for those that finished with one."""
    from orchestrator.training.finetune import head_state_file

    found = {}
    for outcome in outcomes:
        state = head_state_file(paths, outcome.name)
        if (
            trial(outcome.name).head_objective
            and outcome.status == "TERMINATED"
            and state.is_file()
        ):
            found[outcome.name] = state
    return found


def head_segmenters(client: SegmentationClient, states: Mapping[str, Path]) -> dict[str, Segmenter]:
    """Fine-tuning trial -> a segmenter applying its kept head (``states``: its state file) to
    frozen inputs from the run's workers: the exported model's masks, without loading it."""
    import torch

    from models.heads import HeadSegmenter
    from orchestrator.inference.heads import WorkerHeadBackend

    backend = WorkerHeadBackend(client)
    found: dict[str, Segmenter] = {}
    for name, path in states.items():
        head: Any = backend.initial_head()
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        found[name] = HeadSegmenter(head.eval(), backend)
    return found


def evaluate_run(
    config: RunConfig,
    paths: RunPaths,
    prepared: PreparedData,
    segmenter: SegmentationClient,
    policy_files: dict[str, Path],
    references: ReferenceResults | None = None,
    head_folders: dict[str, Path] | None = None,
) -> list[ImageResult]:
    """Every method on the test split, on the val split but the oracles, and the learned ones on
    the training images too; writes ``eval/per_image.csv``, ``eval/val_per_image.csv``,
    ``eval/train_per_image.csv`` and the example masks. ``policy_files``: PPO trial instance ->
    its exported best policy (see :func:`best_policy_paths`).
    ``references``: the policy-free methods if already evaluated (the run computes them while
    the trials train, :mod:`orchestrator.evaluation.references`); computed here otherwise.
    ``head_folders``: fine-tuning trial -> its kept head's state file (see
    :func:`head_models`), each evaluated on the default prompt (:func:`head_segmenters`)."""
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
    scorer = None
    if any(trial(name).needs_reward_net for name in policies):
        scorer = load_checkpoint(
            paths.reward_net,
            backend_id=segmenter.backend_id,
            manifest_hash=prepared.manifest_hash,
        )
    heads = head_segmenters(segmenter, head_folders or {})
    setup = _Setup(
        config, segmenter, policies, references.learners, references.fixed_prompt, scorer, heads
    )
    fitted = references.seconds[FIT_LEARNERS]
    print(f"  {FIT_LEARNERS:20s} {len(train)} train images in {fitted:.1f} s{during}", flush=True)
    rows = _evaluate_split(setup, "test", test_evaluator, references, during)
    write_rows(paths.per_image_csv, rows)
    val = load_split(prepared.ref, "val", config.data.max_eval_images)
    write_rows(
        paths.val_per_image_csv,
        _evaluate_split(setup, "val", make_evaluator(config, val, segmenter)),
    )
    train_rows = _evaluate_split(setup, "train", make_evaluator(config, train, segmenter))
    write_rows(paths.train_per_image_csv, train_rows)
    return rows


def policy_steps(
    policies: Mapping[str, Policy], envs: Mapping[str, SegmentationEnv], evaluator: Evaluator
) -> list[tuple[str, Callable[[], list[ImageResult]]]]:
    """(method, compute) steps of every trial instance's policy (``envs``: each instance's
    environment on the evaluator's images); rows carry the instance's seed. A trial that
    ``starts_from_after`` runs after that trial's policy of the same seed (``combined``), and
    is left out without it."""
    steps = []
    for name, policy in policies.items():
        spec, seed = parse_instance(name)
        assert spec.method is not None, "a PPO trial has an evaluation method"
        if not spec.starts_from_after:
            evaluate = functools.partial(evaluator.policy, spec.method, envs[name], policy)
        elif (before := instance_name(trial(str(spec.after)), seed)) in policies:
            evaluate = functools.partial(
                evaluator.combined, envs[before], policies[before], envs[name], policy
            )
        else:
            continue
        steps.append((spec.method, _seeded(evaluate, seed)))
    return steps


def _seeded(
    evaluate: Callable[[], list[ImageResult]], seed: int
) -> Callable[[], list[ImageResult]]:
    """``evaluate`` with its rows marked as the policy of training seed ``seed``."""
    return lambda: [dataclasses.replace(row, seed=seed) for row in evaluate()]


@dataclass(frozen=True)
class _Setup:
    config: RunConfig
    segmenter: Segmenter
    policies: dict[str, Policy]
    learners: Learners
    fixed_prompt: str
    scorer: RewardScorer | None
    heads: dict[str, Segmenter]


def _head_step(
    on_head: Evaluator, evaluator: Evaluator, method: str, prompt: str
) -> Callable[[], list[ImageResult]]:
    """The head's default-prompt masks, saved as examples where ``evaluator`` (whose baseline
    picked them) keeps them."""

    def compute() -> list[ImageResult]:
        on_head.keep_ids = evaluator.keep_ids
        return on_head.fixed_prompt(method, prompt)

    return compute


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
    steps += policy_steps(policies, envs, evaluator)
    for t, head in setup.heads.items():
        spec, seed = parse_instance(t)
        assert spec.method is not None, "a fine-tuning trial has an evaluation method"
        on_head = dataclasses.replace(evaluator, segmenter=head)
        compute = _head_step(on_head, evaluator, spec.method, config.env.default_prompt)
        steps.append((spec.method, _seeded(compute, seed)))
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
