"""The methods that need no trained policy, evaluated while the trials train.

``baseline``, ``best_fixed_prompt``, the four learners of :mod:`.learners` (fitted on the
training images), ``oracle_prompt`` and ``oracle_postprocess`` depend only on the data, the
segmenter and the config, not on any trial. :func:`start_reference_evaluation`
runs them in a Ray task (reserving no logical CPU, so Tune schedules the trials as before) at
the priority of the trials off the reward-net chain
(:func:`~orchestrator.training.priority.lower_thread_priority`):
it soaks up the cores the trials leave idle (on 2 cores, the one free while only the reward-net
chain still runs) instead of running after Tune. The evaluation stage then only evaluates the
policies and writes every row in the usual order; the answers are the same as computing them
there (same segmenter, same images, deterministic methods).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envs.sources import load_split
from orchestrator.config import RunConfig
from orchestrator.evaluation.learners import Learners, fit_learners, learner_steps
from orchestrator.evaluation.methods import best_fixed_prompt, make_evaluator
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.run_dir import RunPaths
from orchestrator.training.priority import lower_thread_priority

if TYPE_CHECKING:
    from orchestrator.data import PreparedData
    from orchestrator.inference.client import SegmentationClient

FIT_LEARNERS = "learners fitted"
"""Key of the learners' fitting time in :attr:`ReferenceResults.seconds`."""


@dataclass(frozen=True)
class ReferenceResults:
    """The policy-free methods' rows on the test split, the example images the baseline picked
    (the other methods save their masks of those), the fitted learners and best fixed prompt
    (the evaluation applies them to the training images too) and each step's wall time."""

    rows: dict[str, list[ImageResult]]
    keep_ids: frozenset[str]
    learners: Learners
    fixed_prompt: str
    seconds: dict[str, float]


def evaluate_references(
    config: RunConfig, paths: RunPaths, prepared: PreparedData, segmenter: SegmentationClient
) -> ReferenceResults:
    """The policy-free methods on the test split (the learners fitted on the training images
    first); saves their example masks (after clearing stale ones of a resumed run)."""
    test = load_split(prepared.ref, "test", config.data.max_eval_images)
    train = load_split(prepared.ref, "train", config.data.max_train_images)
    shutil.rmtree(paths.examples_dir, ignore_errors=True)
    evaluator = make_evaluator(config, test, segmenter, examples_dir=paths.examples_dir)
    start = time.monotonic()
    learners = fit_learners(config, train, segmenter)
    fixed = best_fixed_prompt(train, segmenter, config.env.prompts)
    seconds = {FIT_LEARNERS: time.monotonic() - start}
    steps = [
        # The baseline goes first: it picks the example images the later methods save.
        ("baseline", evaluator.baseline),
        ("best_fixed_prompt", lambda: evaluator.fixed_prompt("best_fixed_prompt", fixed)),
        *learner_steps(learners, config, evaluator, segmenter),
        ("oracle_prompt", evaluator.oracle_prompt),
        ("oracle_postprocess", evaluator.oracle_postprocess),
    ]
    rows = {}
    for method, compute in steps:
        start = time.monotonic()
        rows[method] = compute()
        seconds[method] = time.monotonic() - start
    return ReferenceResults(rows, evaluator.keep_ids, learners, fixed, seconds)


def start_reference_evaluation(
    config: RunConfig, paths: RunPaths, prepared: PreparedData, segmenter: SegmentationClient
) -> Any:
    """Start :func:`evaluate_references` in a low-priority Ray task; returns its ObjectRef
    (``ray.get`` it for the :class:`ReferenceResults`; an error of the task is raised there)."""
    import ray

    # max_calls=1: the worker process that lowered its priority exits after this task, so no
    # later task inherits it.
    task = ray.remote(num_cpus=0, max_calls=1)(_at_low_priority)
    return task.remote(config, paths, prepared, segmenter)


def _at_low_priority(
    config: RunConfig, paths: RunPaths, prepared: PreparedData, segmenter: SegmentationClient
) -> ReferenceResults:
    lower_thread_priority()
    return evaluate_references(config, paths, prepared, segmenter)
