"""The Tuner: every trial of the run in one Tune experiment, sized to fit the cluster.

Trial resources: each trial samples in its own process (no extra env-runner actors), so it
needs one CPU share. On a 2-CPU machine four trials get 0.5 CPU each and all run at once; on a
cluster each gets a whole CPU. The reward-net trial also asks for ``gpu_mem_mb`` when the GPU
plan left memory for trials, so Tune queues it until that memory is free instead of letting it
OOM next to a Sa2VA worker.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from orchestrator.config import RunConfig, config_to_dict
from orchestrator.experiments import TUNE_EXPERIMENT, RunPaths, trials_for
from orchestrator.trainable import run_trial

MAX_FAILURES = 2
"""Retries of a failed trial (from its last checkpoint) before it is reported as errored."""


def trial_cpus(n_trials: int) -> float:
    """A CPU share per trial so that all trials fit the cluster at once (at most 1 CPU)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, round(total / n_trials, 2)))


def resources_for(cpus: float, plan: Any) -> Any:
    """Per-trial resource request (a function of the trial's config, as Tune allows)."""
    from orchestrator import gpu_budget as gb

    gpu_mb = 0
    if plan is not None and any(node.gpu_mem_mb for node in plan.nodes):
        plan.require_trial_memory(gb.REWARD_NET_TRAIN_MB, "reward-net training")
        gpu_mb = gb.REWARD_NET_TRAIN_MB

    def request(config: dict[str, Any]) -> dict[str, float]:
        if config["trial"] == "reward_net" and gpu_mb:
            return gb.trial_resources(gpu_mb, cpus=cpus)
        return {"cpu": cpus}

    return request


def fit(
    options: Any,
    config: RunConfig,
    paths: RunPaths,
    prepared: Any,
    workers: list[str],
    backend_id: str,
    plan: Any,
) -> tune.ResultGrid:
    """Run (or, with ``--resume``, continue) all trials; returns Tune's ResultGrid."""
    trials = trials_for(config)
    cpus = trial_cpus(len(trials))
    trainable = tune.with_resources(run_trial, resources_for(cpus, plan))
    param_space = {
        "trial": tune.grid_search(trials),
        "run": config_to_dict(config),
        "root": str(paths.root),
        "workers": workers,
        "data_dir": prepared.data_dir,
        "backend_id": backend_id,
        "manifest_hash": prepared.manifest_hash,
    }
    print(f"  {len(trials)} trials, {cpus} CPU each: {', '.join(trials)}")
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
                max_concurrent_trials=len(trials),
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


def trial_label(trial: Any) -> str:
    """``prompt_1c4cd_00000``: trials are recognisable by experiment in Tune's table, the
    dashboard and the run directory."""
    return f"{trial.config['trial']}_{trial.trial_id}"
