"""The Tune trainable: one function runs any trial (see :mod:`orchestrator.experiments`).

Its ``config`` is plain data (Tune stores it in ``params.json``): the trial name, the resolved run
config, the run directory, the segmentation workers' names and the ids that tie a reward-net
checkpoint to this run. Environments reach the models only through a
:class:`~orchestrator.segmentation_client.SegmentationClient` built from those names.

PPO trials write TensorBoard events with the original tags (``rollout/ep_rew_mean``, ...) into
the trial directory, report every iteration to Tune with a checkpoint (RLlib state for resuming
plus ``best_policy.pt``, the exported policy evaluation uses), evaluate that policy on the test
split at the end (``eval/dice``, ... in the last result), and resume from Tune's checkpoint after
a failure or ``--resume``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from tensorboardX import SummaryWriter

from envs.sources import load_samples
from models import reward_net
from models.errors import UserError
from orchestrator import metric_keys as mk
from orchestrator.config import RunConfig, parse_config
from orchestrator.evaluation import METHOD_OF_TRIAL, make_evaluator, summarise
from orchestrator.experiments import ENV_NAME, RunPaths, env_kwargs, make_env
from orchestrator.ppo import ExportedPolicy, build_ppo_config, export_policy, flatten_result
from orchestrator.progress_metrics import export_progress
from orchestrator.reward_training import examples_for, fit
from orchestrator.segmentation_client import SegmentationClient

BEST_POLICY_FILE = "best_policy.pt"
ALGO_DIR = "algo"
REWARD_NET_WAIT_S = 6 * 3600


def run_trial(config: dict[str, Any]) -> None:
    """Tune entry point: dispatch on ``config["trial"]``."""
    run = parse_config(config["run"], source="trial config")
    paths = RunPaths(Path(config["root"]))
    client = SegmentationClient(config["workers"])
    if config["trial"] == "reward_net":
        _reward_net_trial(run, paths, config, client)
    else:
        _ppo_trial(config["trial"], run, paths, config, client)


def _ppo_trial(
    trial: str, run: RunConfig, paths: RunPaths, config: dict[str, Any], client: Any
) -> None:
    if trial == "reward_guided":
        _wait_for(paths.reward_net)
    data = {
        "data": config["data_dir"],
        "manifest": str(paths.manifest),
        "split": "train",
        "max_images": run.data.max_train_images,
    }
    kwargs = env_kwargs(trial, run, data, **_reward_net_ids(paths, config))
    tune.register_env(ENV_NAME, make_env)
    env_config = {"trial": trial, "kwargs": kwargs, "segmenter": client}
    algo = build_ppo_config(run.ppo, ENV_NAME, env_config).build_algo()
    trial_dir = Path(tune.get_context().get_trial_dir())
    best = BestPolicy(trial_dir)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            algo.restore_from_path(Path(directory) / ALGO_DIR)
            best.restore(Path(directory))
    writer = _writer(trial_dir)
    steps = 0.0
    try:
        while steps < run.ppo.total_env_steps:
            metrics = flatten_result(algo.train())
            metrics.update(_inference_metrics(client))
            steps = metrics.get(mk.ENV_STEPS, steps)
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step=int(steps))
            writer.flush()
            best.offer(algo.get_module(), metrics, trial, config)
            export_progress(trial, metrics)
            _report_with_checkpoint(algo, best, metrics)
        evaluation = _evaluate_best(trial, run, paths, config, client, best)
        export_progress(trial, evaluation)
        for key, value in evaluation.items():
            writer.add_scalar(key, value, global_step=int(steps))
        _report_with_checkpoint(algo, best, {**metrics, **evaluation})
    finally:
        writer.close()
        algo.stop()


def _writer(trial_dir: Path) -> SummaryWriter:
    # Tune's own TBX logger writes events.out.tfevents.<second>.<host> into the same directory:
    # a suffix keeps the two files apart when both start within one second.
    return SummaryWriter(str(trial_dir), filename_suffix=".sa2va-rl")


def _reward_net_ids(paths: RunPaths, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "reward_net": str(paths.reward_net),
        "backend_id": config["backend_id"],
        "manifest_hash": config["manifest_hash"],
    }


class BestPolicy:
    """The exported policy of the iteration with the highest ``rollout/ep_rew_mean`` so far
    (RLlib's 100-episode mean): what evaluation uses. Kept in every checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.score = -math.inf
        self.path = directory / BEST_POLICY_FILE

    def offer(self, module: Any, metrics: dict[str, float], trial: str, config: dict[str, Any]):
        score = metrics.get(mk.EP_REW_MEAN, -math.inf)
        if score > self.score or not self.path.is_file():
            self.score = score
            metadata = {
                "trial": trial,
                "backend_id": config["backend_id"],
                "manifest_hash": config["manifest_hash"],
                "env_steps": metrics.get(mk.ENV_STEPS, 0.0),
                "ep_rew_mean": score,
            }
            export_policy(module, self.path, metadata)

    def restore(self, directory: Path) -> None:
        saved = directory / BEST_POLICY_FILE
        if saved.is_file():
            shutil.copyfile(saved, self.path)
            self.score = float(
                ExportedPolicy.load(self.path).metadata.get("ep_rew_mean", -math.inf)
            )


def _report_with_checkpoint(algo: Any, best: BestPolicy, metrics: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        algo.save_to_path(Path(directory) / ALGO_DIR)
        shutil.copyfile(best.path, Path(directory) / BEST_POLICY_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _evaluate_best(
    trial: str,
    run: RunConfig,
    paths: RunPaths,
    config: dict[str, Any],
    client: Any,
    best: BestPolicy,
) -> dict[str, float]:
    """``eval/<metric>`` of the best policy on the test split, so Tune's ResultGrid can compare
    experiments; the run's report evaluates every method on the same images again."""
    test = load_samples(
        config["data_dir"],
        split="test",
        manifest=paths.manifest,
        max_images=run.data.max_eval_images,
    )
    evaluator = make_evaluator(run, test, client)
    kwargs = env_kwargs(trial, run, {"samples": test}, **_reward_net_ids(paths, config))
    env = make_env({"trial": trial, "kwargs": kwargs, "segmenter": client})
    rows = evaluator.policy(METHOD_OF_TRIAL[trial], env, ExportedPolicy.load(best.path).act)
    summary = summarise(rows)[METHOD_OF_TRIAL[trial]]
    return {mk.EVAL_METRICS[name]: est.mean for name, est in summary.metrics.items()}


def _inference_metrics(client: Any) -> dict[str, float]:
    total = client.stats()["total"]
    metrics = {
        mk.INFERENCE_FORWARD_PASSES: float(total["forward_passes"]),
        mk.INFERENCE_CACHE_HITS: float(total["memory_hits"] + total["disk_hits"]),
    }
    if total.get("latency_ms_p95_worst") is not None:
        metrics[mk.INFERENCE_P95_MS] = float(total["latency_ms_p95_worst"])
    return metrics


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + REWARD_NET_WAIT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"the reward network {path} never appeared; did its trial fail?")
        time.sleep(2.0)


def _reward_net_trial(run: RunConfig, paths: RunPaths, config: dict[str, Any], client: Any) -> None:
    cfg = run.reward_net
    writer = _writer(Path(tune.get_context().get_trial_dir()))
    examples = {}
    for split in ("train", "val"):
        samples = load_samples(
            config["data_dir"], split=split, manifest=paths.manifest, max_images=cfg.max_images
        )
        examples[split] = examples_for(run, samples, client)

    def on_epoch(epoch: int, val_mae: float) -> None:
        writer.add_scalar(mk.REWARD_NET_VAL_MAE, val_mae, global_step=epoch)
        export_progress("reward_net", {mk.REWARD_NET_VAL_MAE: val_mae})
        tune.report({mk.REWARD_NET_EPOCH: float(epoch), mk.REWARD_NET_VAL_MAE: val_mae})

    model, report = fit(run, examples["train"], examples["val"], on_epoch=on_epoch)
    writer.close()
    reward_net.save_checkpoint(
        paths.reward_net,
        model,
        {
            "input_size": cfg.input_size,
            "backend_id": config["backend_id"],
            "manifest_hash": config["manifest_hash"],
            "report": json.dumps(report.to_dict()),
        },
    )
    paths.reward_net_report.write_text(json.dumps(report.to_dict(), indent=2))
    _save_val_predictions(paths, model, examples["val"])
    dice = report.targets["dice"]
    tune.report(
        {
            mk.REWARD_NET_EPOCH: float(cfg.epochs),
            mk.REWARD_NET_VAL_MAE: dice.mae,
            mk.REWARD_NET_VAL_SPEARMAN: dice.spearman,
            mk.REWARD_NET_MEAN_PREDICTOR_MAE: dice.mean_predictor_mae,
        }
    )


def _save_val_predictions(paths: RunPaths, model: Any, val: list[Any]) -> None:
    """The validation predictions behind ``report.json``, for the report's scatter plot."""
    from orchestrator.report import (
        RewardNetPredictions,
        reward_net_predictions_path,
        write_reward_net_predictions,
    )

    x = torch.from_numpy(np.stack([e.x for e in val]))
    predictions = RewardNetPredictions(
        [e.image_id for e in val], reward_net.predict(model, x), np.stack([e.y for e in val])
    )
    write_reward_net_predictions(reward_net_predictions_path(paths), predictions)
