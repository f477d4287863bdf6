"""The Tuner: every trial of the run in one Tune experiment, sized to fit the cluster.

Trial resources: each trial samples in its own process (no extra env-runner actors), so it
needs one CPU share. On a 2-CPU machine four trials get 0.5 CPU each and all run at once; on a
cluster each gets a whole CPU. Which trial goes first when they share cores is a matter of
OS priority, not of shares (:mod:`orchestrator.training.priority`). Trials that use a GPU (the
registry's ``uses_gpu``: reward-net training) also ask for ``gpu_mem_mb`` when the GPU plan
left memory for trials, so Tune queues them until that memory is free instead of letting them
OOM next to a Sa2VA worker; the plan's refusal, if any, came in stage 3
(:func:`trial_gpu_mem_mb`), before any worker started.

:class:`StatusCallback` is the driver's side of the run's trial status board
(:mod:`orchestrator.training.trial_status`): Tune sees a trial's process die, the trial does not.
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
from orchestrator.training.disk_watch import DiskWatch, disk_watched, repair_tune_state
from orchestrator.training.trainable import run_trial
from orchestrator.training.trial_status import READY, RUNNING, board

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
    from orchestrator.gpu import devices

    def request(config: dict[str, Any]) -> dict[str, float]:
        if trial(config["trial"]).uses_gpu and gpu_mem_mb:
            return devices.trial_resources(gpu_mem_mb, cpus=cpus)
        return {"cpu": cpus}

    return request


def trial_gpu_mem_mb(config: RunConfig, plan: GpuPlan | None) -> int:
    """MB of GPU memory each GPU-using trial of ``config`` reserves when the plan left GPU memory
    for trials (else 0: they train on the CPU): the largest footprint among them, reward-net
    training's or, fine-tuning a Sa2VA head, that head's. Raises the plan's refusal when some
    memory is left but too little (call it in stage 3)."""
    from orchestrator.gpu import footprints

    users = [t for t in trials_for(config) if t.uses_gpu]
    if not users or plan is None or not any(node.gpu_mem_mb for node in plan.nodes):
        return 0
    need, what = footprints.REWARD_NET_TRAIN_MB, "reward-net training"
    if config.backend.name == "sa2va" and any(t.head_objective for t in users):
        need, what = max(need, footprints.SA2VA_HEAD_TRAIN_MB), "Sa2VA head fine-tuning"
    plan.require_trial_memory(need, what)
    return need


def fit(
    options: RunOptions,
    config: RunConfig,
    paths: RunPaths,
    run_id: str,
    prepared: PreparedData,
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
        run_id=run_id,
        backend_id=backend_id,
        data=prepared.ref,
        gpu_mem_mb=gpu_mem_mb,
    ).to_param()
    # Tune's one edge: the instances differ only in "trial" (registry name and seed index),
    # which Tune grid-searches; a trial's GPU reservation applies only where it uses a GPU.
    param_space = {**spec, "trial": tune.grid_search(names)}
    print(f"  {len(names)} trials, {cpus} CPU each: {', '.join(names)}")
    if options.resume and (repaired := repair_tune_state(paths.tune_dir)):
        print(f"  {repaired}")
    if options.resume and tune.Tuner.can_restore(str(paths.tune_dir)):
        print(f"  resuming the Tune experiment in {paths.tune_dir}")
        # Its run config (with the StatusCallback of this run id) comes back with it.
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
                callbacks=[
                    StatusCallback(run_id),
                    DiskWatch(paths.tune_dir, disk_watched(config, paths)),
                ],
                verbose=1,
            ),
        )
    return tuner.fit()


class StatusCallback(tune.Callback):
    """On the driver: tells the run's status board what only Tune sees. FAILED when Tune
    gives up on a trial (it raised on its last attempt, or its process died, e.g. SIGKILL;
    the reason is the error the trial noted, else Tune's); READY for a trial Tune saw finish,
    including one finished in an earlier attempt of a resumed run; RUNNING again while Tune
    retries a failed attempt. Picklable (Tune keeps it with the experiment): it holds the run
    id and finds the board by it."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._finished: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run_id = state["run_id"]
        self._finished = set()  # a restored experiment reports its finished trials again

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        for finished in trials:
            if finished.status == finished.TERMINATED:
                self._ready(finished)

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._ready(trial)

    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        board(self.run_id).set(str(trial.config["trial"]), RUNNING, "retrying a failed attempt")

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        self._finished.add(trial.trial_id)
        board(self.run_id).fail(str(trial.config["trial"]), f"Tune: {_last_error(trial)}")

    def _ready(self, trial: Trial) -> None:
        if trial.trial_id not in self._finished:
            self._finished.add(trial.trial_id)
            board(self.run_id).set(str(trial.config["trial"]), READY)


def _last_error(trial: Trial) -> str:
    """One line of the trial's last error as Tune recorded it (:func:`error_line`)."""
    try:  # the driver's own copy, written before Tune calls back (storage may lag)
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError as err:
        return f"its error could not be read ({err})"
    return error_line(text.rsplit("Failure # ", 1)[-1].partition("\n")[2] if text else "")


def error_line(text: str) -> str:
    """The line of a trial's error that says what happened: the exception's own line when the
    trial raised (Ray's text starts ``ray::<task>`` and ends with it), else the first line
    (Ray's words on a process that died, e.g. SIGKILL)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "its process ended without an error"
    return (lines[-1] if lines[0].startswith("ray::") else lines[0])[:500]


def outcomes(grid: tune.ResultGrid) -> list[TrialOutcome]:
    """Every trial of Tune's ResultGrid as the later stages read it; prints each errored
    trial's :func:`error_line`."""
    found = []
    for index in range(len(grid)):
        result = grid[index]
        checkpoint = result.checkpoint
        if result.error is not None:
            name = (result.config or {}).get("trial")
            print(f"  trial {name} ended in ERROR: {error_line(str(result.error))}")
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
