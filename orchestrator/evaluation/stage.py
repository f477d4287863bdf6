"""The run's evaluation stage: every method on the test split, same images for every method.

Writes ``eval/per_image.csv`` and the example masks ``eval/examples/*.png`` (every method's
final mask of the worst, median and best baseline image); the report is built from those files.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from envs.sources import load_samples
from orchestrator.config import RunConfig
from orchestrator.evaluation.methods import Policy, best_fixed_prompt, make_evaluator
from orchestrator.evaluation.per_image import ImageResult, write_rows
from orchestrator.experiments import (
    COMBINED_METHOD,
    COMBINED_OF,
    TrialOutcome,
    build_env,
    env_kwargs,
    trial,
)
from orchestrator.run_dir import BEST_POLICY_FILE, RunPaths

if TYPE_CHECKING:
    from orchestrator.inference.client import SegmentationClient
    from orchestrator.pipeline import PreparedData


def best_policy_paths(outcomes: Iterable[TrialOutcome]) -> dict[str, Path]:
    """Trial -> ``best_policy.pt`` of its latest checkpoint, for PPO trials that have one."""
    found = {}
    for outcome in outcomes:
        if trial(outcome.name).is_ppo and outcome.checkpoint is not None:
            path = outcome.checkpoint / BEST_POLICY_FILE
            if path.is_file():
                found[outcome.name] = path
    return found


def evaluate_run(
    config: RunConfig,
    paths: RunPaths,
    prepared: PreparedData,
    segmenter: SegmentationClient,
    policy_files: dict[str, Path],
) -> list[ImageResult]:
    """Every method on the test split; writes ``eval/per_image.csv`` and the example masks.
    ``policy_files``: PPO trial -> its exported best policy (see :func:`best_policy_paths`)."""
    from orchestrator.training.ppo import ExportedPolicy

    test = load_samples(
        prepared.data_dir,
        split="test",
        manifest=paths.manifest,
        max_images=config.data.max_eval_images,
    )
    train = load_samples(
        prepared.data_dir,
        split="train",
        manifest=paths.manifest,
        max_images=config.data.max_train_images,
    )
    examples = paths.examples_dir
    shutil.rmtree(examples, ignore_errors=True)  # a resumed run must not mix in stale masks
    evaluator = make_evaluator(config, test, segmenter, examples_dir=examples)
    policies: dict[str, Policy] = {t: ExportedPolicy.load(p).act for t, p in policy_files.items()}
    envs = {
        name: build_env(
            trial(name),
            segmenter,
            env_kwargs(
                trial(name),
                config,
                {"samples": test},
                reward_net=str(paths.reward_net),
                backend_id=segmenter.backend_id,
                manifest_hash=prepared.manifest_hash,
            ),
        )
        for name in policies
    }
    fixed = best_fixed_prompt(train, segmenter, config.env.prompts)
    # The baseline goes first: it picks the example images the later methods save masks of.
    steps: list[tuple[str, Callable[[], list[ImageResult]]]] = [
        ("baseline", evaluator.baseline),
        ("best_fixed_prompt", lambda: evaluator.fixed_prompt("best_fixed_prompt", fixed)),
    ]
    for name, policy in policies.items():
        method = trial(name).method
        assert method is not None, "a PPO trial has an evaluation method"
        steps.append((method, functools.partial(evaluator.policy, method, envs[name], policy)))
    first, then = (t.name for t in COMBINED_OF)
    if first in policies and then in policies:
        steps.append(
            (
                COMBINED_METHOD,
                lambda: evaluator.combined(
                    envs[first], policies[first], envs[then], policies[then]
                ),
            )
        )
    steps += [
        ("oracle_prompt", evaluator.oracle_prompt),
        ("oracle_postprocess", evaluator.oracle_postprocess),
    ]
    rows: list[ImageResult] = []
    for method, compute in steps:
        start = time.monotonic()
        rows += compute()
        print(f"  {method:20s} {len(test)} images in {time.monotonic() - start:.1f} s", flush=True)
    write_rows(paths.per_image_csv, rows)
    return rows
