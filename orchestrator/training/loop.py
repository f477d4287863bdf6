"""The PPO loop of one trial as a plain function, writing through a small result sink.

:func:`train_ppo` builds the trial's RLlib PPO (sampling in this process), trains until
``ppo.total_env_steps``, writes TensorBoard events with the original tags into the sink's trial
directory, keeps the best policy (by ``rollout/ep_rew_mean``) as ``best_policy.pt``, evaluates
it on the test split at the end (``eval/<metric>``) and hands every iteration's metrics to the
sink. The sink is Tune (:mod:`orchestrator.training.trainable`: results, checkpoints, resume)
or a local directory (``sa2va-rl train --local``); the loop does not know which.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.tune.registry import register_env
from tensorboardX import SummaryWriter

from envs.normalisation import ObservationStats, fit_stats
from envs.objectives import NoObjective
from orchestrator import metric_keys as mk
from orchestrator.evaluation.methods import make_evaluator
from orchestrator.evaluation.statistics import summarise
from orchestrator.experiments import ENV_NAME, TrialSpec, make_env, trial_env
from orchestrator.run_dir import ALGO_DIR, BEST_POLICY_FILE, OBSERVATION_STATS_FILE
from orchestrator.training.ppo import (
    ExportedPolicy,
    build_ppo_config,
    export_policy,
    flatten_result,
)
from orchestrator.training.progress_metrics import export_progress
from orchestrator.training.trial_status import wait_for

if TYPE_CHECKING:
    from orchestrator.inference.client import SegmentationClient


class ResultSink(Protocol):
    """Where a trial's results go.

    Attributes:
        trial_dir: the trial's directory (TensorBoard events, ``best_policy.pt``).
        keeps_checkpoints: whether :meth:`report` wants a checkpoint directory with each result
            (saving RLlib's state costs time; a sink that cannot resume does not ask for it).
    """

    trial_dir: Path
    keeps_checkpoints: bool

    def restored(self) -> AbstractContextManager[Path | None]:
        """The directory of the checkpoint to resume from (``None``: start fresh)."""
        ...

    def report(self, metrics: Mapping[str, float], checkpoint: Path | None = None) -> None:
        """One result (and, when kept, the checkpoint directory to persist with it)."""
        ...


class PpoAlgorithm(Protocol):
    """What the loop drives: RLlib's ``Algorithm`` (under Tune) or
    :class:`~orchestrator.training.local_ppo.LocalPPO` (``train --local``)."""

    def train(self) -> dict[str, Any]: ...

    def get_module(self) -> RLModule | None: ...

    def stop(self) -> None: ...


def rllib_algorithm(algo: PpoAlgorithm) -> Algorithm:
    """``algo`` as RLlib's ``Algorithm``: only it saves and restores checkpoints (a sink that
    keeps checkpoints is Tune's, which never runs :class:`LocalPPO`)."""
    if not isinstance(algo, Algorithm):
        raise TypeError(f"checkpoints need RLlib's Algorithm, not {type(algo).__name__}")
    return algo


def tensorboard_writer(trial_dir: Path) -> SummaryWriter:
    """The trial's TensorBoard writer."""
    # Tune's own TBX logger writes events.out.tfevents.<second>.<host> into the same directory:
    # a suffix keeps the two files apart when both start within one second.
    return SummaryWriter(str(trial_dir), filename_suffix=".sa2va-rl")


def train_ppo(
    spec: TrialSpec, client: SegmentationClient, sink: ResultSink, *, local: bool = False
) -> dict[str, float]:
    """Train the PPO trial of ``spec`` to ``ppo.total_env_steps`` behind its fixed observation
    normalisation (:func:`observation_stats`); returns the last metrics (with the best policy's
    ``eval/<metric>``). ``local``: RLlib's PPO without Ray
    (:class:`~orchestrator.training.local_ppo.LocalPPO`) instead of its ``Algorithm``."""
    run = spec.run
    register_env(ENV_NAME, make_env)
    env_config: dict[str, Any] = {"spec": spec.to_param(), "segmenter": client}
    with sink.restored() as directory:
        stats = observation_stats(spec, client, directory)
        if stats is not None:
            env_config["obs_stats"] = stats.to_dict()
        config = build_ppo_config(run.ppo, ENV_NAME, env_config)
        algo: PpoAlgorithm
        if local:
            from orchestrator.training.local_ppo import LocalPPO

            algo = LocalPPO(config)
        else:
            algo = config.build_algo()
        best = BestPolicy(sink.trial_dir, stats)
        if directory is not None:
            rllib_algorithm(algo).restore_from_path(directory / ALGO_DIR)
            best.restore(directory)
    writer = tensorboard_writer(sink.trial_dir)
    steps, metrics = 0.0, {}
    try:
        # Built and normalised while the awaited trial ran; the first step needs its outputs.
        wait_for(spec)
        while steps < run.ppo.total_env_steps:
            metrics = flatten_result(algo.train())
            metrics.update(inference_metrics(client))
            steps = metrics.get(mk.ENV_STEPS, steps)
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step=int(steps))
            writer.flush()
            best.offer(algo.get_module(), metrics, spec)
            export_progress(spec.trial.name, metrics)
            _report(sink, algo, best, metrics)
        evaluation = evaluate_best(spec, client, best)
        export_progress(spec.trial.name, evaluation)
        for key, value in evaluation.items():
            writer.add_scalar(key, value, global_step=int(steps))
        metrics = {**metrics, **evaluation}
        _report(sink, algo, best, metrics)
    finally:
        writer.close()
        algo.stop()
    return metrics


def observation_stats(
    spec: TrialSpec, client: SegmentationClient, checkpoint: Path | None
) -> ObservationStats | None:
    """The trial's fixed observation normalisation (``None`` with
    ``ppo.normalize_observations: false``): the checkpoint's when resuming, else the mean/std of
    ``ppo.normalization_steps`` random-policy steps on the training images (seeded by
    ``ppo.seed``). Observations only: the env's objective is replaced by
    :class:`~envs.objectives.NoObjective` (what an env observes never depends on it), so neither
    ground truth nor the reward net is touched, and the reward-guided trial fits its statistics
    while the reward net still trains."""
    ppo = spec.run.ppo
    if not ppo.normalize_observations:
        return None
    if checkpoint is not None and (checkpoint / OBSERVATION_STATS_FILE).is_file():
        return ObservationStats.from_dict(
            json.loads((checkpoint / OBSERVATION_STATS_FILE).read_text())
        )
    env = trial_env(spec, client, "train", spec.run.data.max_train_images)
    env.objective = NoObjective()
    return fit_stats(env, ppo.normalization_steps, seed=ppo.seed)


class BestPolicy:
    """The exported policy of the iteration with the highest ``rollout/ep_rew_mean`` so far
    (RLlib's 100-episode mean): what evaluation uses. Kept in every checkpoint."""

    def __init__(self, directory: Path, stats: ObservationStats | None = None) -> None:
        self.score = -math.inf
        self.path = directory / BEST_POLICY_FILE
        self.stats = stats

    def offer(self, module: RLModule | None, metrics: Mapping[str, float], spec: TrialSpec) -> None:
        score = metrics.get(mk.EP_REW_MEAN, -math.inf)
        if score > self.score or not self.path.is_file():
            self.score = score
            metadata = {
                "trial": spec.trial.name,
                "backend_id": spec.backend_id,
                "manifest_hash": spec.manifest_hash,
                "env_steps": metrics.get(mk.ENV_STEPS, 0.0),
                "ep_rew_mean": score,
            }
            assert isinstance(module, torch.nn.Module), "PPO's RLModule is a torch module"
            export_policy(module, self.path, metadata, self.stats)

    def restore(self, directory: Path) -> None:
        saved = directory / BEST_POLICY_FILE
        if saved.is_file():
            shutil.copyfile(saved, self.path)
            self.score = float(
                ExportedPolicy.load(self.path).metadata.get("ep_rew_mean", -math.inf)
            )


def _report(
    sink: ResultSink, algo: PpoAlgorithm, best: BestPolicy, metrics: dict[str, float]
) -> None:
    if not sink.keeps_checkpoints:
        sink.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        rllib_algorithm(algo).save_to_path(Path(directory) / ALGO_DIR)
        shutil.copyfile(best.path, Path(directory) / BEST_POLICY_FILE)
        if best.stats is not None:
            stats = json.dumps(best.stats.to_dict())
            (Path(directory) / OBSERVATION_STATS_FILE).write_text(stats)
        sink.report(metrics, checkpoint=Path(directory))


def evaluate_best(
    spec: TrialSpec, client: SegmentationClient, best: BestPolicy
) -> dict[str, float]:
    """``eval/<metric>`` of the best policy on the test split, so Tune's ResultGrid can compare
    experiments; the run's report evaluates every method on the same images again."""
    run, method = spec.run, spec.trial.method
    assert method is not None, "a PPO trial has an evaluation method"
    env = trial_env(spec, client, "test", run.data.max_eval_images)
    evaluator = make_evaluator(run, env.samples, client)
    rows = evaluator.policy(method, env, ExportedPolicy.load(best.path).act)
    summary = summarise(rows)[method]
    return {mk.EVAL_METRICS[name]: est.mean for name, est in summary.metrics.items()}


def inference_metrics(client: SegmentationClient) -> dict[str, float]:
    """The workers' forward passes, cache hits and worst p95 latency, as metric keys."""
    total = client.stats()["total"]
    metrics = {
        mk.INFERENCE_FORWARD_PASSES: float(total["forward_passes"]),
        mk.INFERENCE_CACHE_HITS: float(total["memory_hits"] + total["disk_hits"]),
    }
    if total.get("latency_ms_p95_worst") is not None:
        metrics[mk.INFERENCE_P95_MS] = float(total["latency_ms_p95_worst"])
    return metrics
