"""The Tuner: every trial of the run in one Tune experiment, sized to fit the cluster.

Trial resources: each trial samples in its own process (no extra env-runner actors), so it
needs one CPU share. On a 2-CPU machine four trials get 0.5 CPU each and all run at once; on a
cluster each gets a whole CPU. Which trial goes first when they share cores is a matter of
OS priority, not of shares (:mod:`orchestrator.training.priority`). Trials that use a GPU (the
registry's ``uses_gpu``: reward-net training) also ask for ``gpu_mem_mb`` when the GPU plan
left memory for trials, so Tune queues them until that memory is free instead of letting them
OOM next to a Sa2VA worker; the plan's refusal, if any, came in stage 3
(:func:`trial_gpu_mem_mb`), before any worker started.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from orchestrator.config import RunConfig
from orchestrator.experiments import (
    TrialOutcome,
    TrialSpec,
    instance_names,
    trial,
    trials_for,
)
from orchestrator.run_dir import TUNE_EXPERIMENT, RunPaths
from orchestrator.training.reward_net_status import clear_failed
from orchestrator.training.trainable import run_trial

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from orchestrator.data import PreparedData
    from orchestrator.gpu.budget import GpuPlan
    from orchestrator.pipeline import RunOptions

MAX_FAILURES = 2
"""Retries of a failed trial (from its last checkpoint) before it is reported as errored."""


def trial_cpus(n_trials: int) -> float:
    """A CPU share per trial so that all trials fit the cluster at once (at most 1 CPU)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, round(total / n_trials, 2)))


def resources_for(cpus: float, gpu_mem_mb: int) -> Callable[[dict[str, Any]], dict[str, float]]:
    """Per-trial resource request (a function of the trial's config, as Tune allows): only a
    trial that uses a GPU asks for ``gpu_mem_mb`` (and only when the plan left any)."""
    from orchestrator.gpu import budget as gb

    def request(config: dict[str, Any]) -> dict[str, float]:
        if trial(config["trial"]).uses_gpu and gpu_mem_mb:
            return gb.trial_resources(gpu_mem_mb, cpus=cpus)
        return {"cpu": cpus}

    return request


def trial_gpu_mem_mb(config: RunConfig, plan: GpuPlan | None) -> int:
    """MB of GPU memory each GPU-using trial of ``config`` reserves: reward-net training's
    footprint when the plan left GPU memory for trials, else 0 (it trains on the CPU). Raises
    the plan's refusal when some memory is left but too little (call it in stage 3)."""
    from orchestrator.gpu import budget as gb

    users = [t for t in trials_for(config) if t.uses_gpu]
    if not users or plan is None or not any(node.gpu_mem_mb for node in plan.nodes):
        return 0
    plan.require_trial_memory(gb.REWARD_NET_TRAIN_MB, "reward-net training")
    return gb.REWARD_NET_TRAIN_MB


def fit(
    options: RunOptions,
    config: RunConfig,
    paths: RunPaths,
    prepared: PreparedData,
    workers: list[str],
    backend_id: str,
    gpu_mem_mb: int,
) -> tune.ResultGrid:
    """Run (or, with ``--resume``, continue) all trials; returns Tune's ResultGrid.
    ``gpu_mem_mb``: what each GPU-using trial reserves (:func:`trial_gpu_mem_mb`, stage 3)."""
    trials = trials_for(config)
    names = instance_names(config)
    cpus = trial_cpus(len(names))
    # Tune also accepts a function returning a resource dict (its stub names only PGFs).
    trainable = tune.with_resources(run_trial, resources_for(cpus, gpu_mem_mb))  # type: ignore[arg-type]
    spec = TrialSpec(
        trial=trials[0],
        run=config,
        root=str(paths.root),
        workers=tuple(workers),
        backend_id=backend_id,
        data=prepared.ref,
        gpu_mem_mb=gpu_mem_mb,
    ).to_param()
    # Tune's one edge: the instances differ only in "trial" (registry name and seed index),
    # which Tune grid-searches; a trial's GPU reservation applies only where it uses a GPU.
    param_space = {**spec, "trial": tune.grid_search(names)}
    print(f"  {len(names)} trials, {cpus} CPU each: {', '.join(names)}")
    if any(t.trains_reward_net for t in trials):
        clear_failed(paths)  # the reward-net trial runs (again): its last failure is history
    if options.resume and tune.Tuner.can_restore(str(paths.tune_dir)):
        print(f"  resuming the Tune experiment in {paths.tune_dir}")
        tuner = tune.Tuner.restore(
            str(paths.tune_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=len(names),
                trial_name_creator=trial_label,
                trial_dirname_creator=trial_label,
            ),
            run_config=tune.RunConfig(
                name=TUNE_EXPERIMENT,
                storage_path=str(paths.root),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                verbose=1,
            ),
        )
    return tuner.fit()


def outcomes(grid: tune.ResultGrid) -> list[TrialOutcome]:
    """Every trial of Tune's ResultGrid as the later stages read it."""
    found = []
    for index in range(len(grid)):
        result = grid[index]
        checkpoint = result.checkpoint
        found.append(
            TrialOutcome(
                name=str((result.config or {})["trial"]),
                status="ERROR" if result.error is not None else "TERMINATED",
                checkpoint=None if checkpoint is None else Path(checkpoint.path),
            )
        )
    return found


def trial_label(tune_trial: Trial) -> str:
    """``prompt_1c4cd_00000``: trials are recognisable by experiment in Tune's table, the
    dashboard and the run directory."""
    return f"{tune_trial.config['trial']}_{tune_trial.trial_id}"
