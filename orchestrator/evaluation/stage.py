"""The run's evaluation stage: every method on the test split, same images for every method.

Writes ``eval/per_image.csv`` and the example masks ``eval/examples/*.png`` (every method's
final mask of the worst, median and best baseline image); the report is built from those files.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from envs.sources import load_split
from models.reward_net import load_checkpoint
from orchestrator.config import RunConfig
from orchestrator.evaluation.methods import Policy, make_evaluator
from orchestrator.evaluation.per_image import ImageResult, write_rows
from orchestrator.evaluation.references import (
    REFERENCE_METHODS,
    ReferenceResults,
    evaluate_references,
)
from orchestrator.experiments import (
    COMBINED_METHOD,
    COMBINED_OF,
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


def evaluate_run(
    config: RunConfig,
    paths: RunPaths,
    prepared: PreparedData,
    segmenter: SegmentationClient,
    policy_files: dict[str, Path],
    references: ReferenceResults | None = None,
) -> list[ImageResult]:
    """Every method on the test split; writes ``eval/per_image.csv`` and the example masks.
    ``policy_files``: PPO trial -> its exported best policy (see :func:`best_policy_paths`).
    ``references``: the policy-free methods if already evaluated (the run computes them while
    the trials train, :mod:`orchestrator.evaluation.references`); computed here otherwise."""
    from orchestrator.training.ppo import ExportedPolicy

    during = "" if references is None else " (while the trials trained)"
    if references is None:
        references = evaluate_references(config, paths, prepared, segmenter)
    test = load_split(prepared.ref, "test", config.data.max_eval_images)
    evaluator = make_evaluator(config, test, segmenter, examples_dir=paths.examples_dir)
    evaluator.keep_ids = references.keep_ids
    policies: dict[str, Policy] = {t: ExportedPolicy.load(p).act for t, p in policy_files.items()}
    scorer = None
    if any(trial(name).needs_reward_net for name in policies):
        scorer = load_checkpoint(
            paths.reward_net,
            backend_id=segmenter.backend_id,
            manifest_hash=prepared.manifest_hash,
        )
    envs = {name: build_env(trial(name), config, test, segmenter, scorer) for name in policies}
    steps: list[tuple[str, Callable[[], list[ImageResult]]]] = []
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
    computed: dict[str, list[ImageResult]] = {}
    seconds = dict(references.seconds)
    for method, compute in steps:
        start = time.monotonic()
        computed[method] = compute()
        seconds[method] = time.monotonic() - start
    # The usual order: baseline, best fixed prompt, the policies, combined, the oracles.
    order = [*REFERENCE_METHODS[:2], *computed, *REFERENCE_METHODS[2:]]
    rows: list[ImageResult] = []
    for method in order:
        rows += references.rows[method] if method in references.rows else computed[method]
        when = during if method in references.rows else ""
        print(f"  {method:20s} {len(test)} images in {seconds[method]:.1f} s{when}", flush=True)
    write_rows(paths.per_image_csv, rows)
    return rows
