"""Reward-network training from a run config: the one recipe the run's reward-net trial and
``sa2va-rl train-reward-net`` share (which masks, how many, which hyper-parameters), and the
trial itself (:func:`train_run_reward_net`), which writes the run's ``reward_net/`` files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from envs.mask_ops import MaskOpsConfig
from envs.reward_data import build_examples
from envs.sample import Sample
from envs.sources import load_split
from models import reward_net
from models.reward_net import RewardExample, RewardNet, RewardNetReport, train_reward_net
from models.segmentation import Segmenter
from orchestrator import metric_keys as mk
from orchestrator import run_dir
from orchestrator.config import RunConfig
from orchestrator.disk import inject_fault
from orchestrator.experiments import TrialSpec
from orchestrator.run_dir import RunPaths
from orchestrator.training.progress_metrics import export_progress
from orchestrator.training.reward_predictions import (
    RewardNetPredictions,
    write_reward_net_predictions,
)

if TYPE_CHECKING:
    from orchestrator.training.loop import ResultSink


def examples_for(
    config: RunConfig,
    samples: Iterable[Sample],
    segmenter: Segmenter,
    on_image: Callable[[int], None] | None = None,
) -> list[RewardExample]:
    """Scored masks of ``samples`` (every prompt, post-processing sequences of the config and
    perturbed soft masks, ``reward_net.soft_per_image``)."""
    cfg = config.reward_net
    return build_examples(
        samples,
        segmenter,
        config.env.prompts,
        per_image=cfg.samples_per_image,
        input_size=cfg.input_size,
        seed=cfg.seed,
        ops=MaskOpsConfig.from_dict(dict(config.mask_ops)),
        on_image=on_image,
        soft=cfg.soft_per_image,
    )


def fit(
    config: RunConfig,
    train: list[RewardExample],
    val: list[RewardExample],
    on_epoch: Callable[[int, float], None] | None = None,
    device: str = "cpu",
) -> tuple[RewardNet, RewardNetReport]:
    """Train with the config's reward-net hyper-parameters (best epoch by validation MAE) on
    ``device``."""
    cfg = config.reward_net
    return train_reward_net(
        train,
        val,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        on_epoch=on_epoch,
        device=device,
    )


def train_run_reward_net(
    spec: TrialSpec, segmenter: Segmenter, sink: ResultSink
) -> dict[str, float]:
    """The reward-net trial: examples of the train and val splits, training with one result
    per epoch, then ``reward_net/best_reward_net.pt`` (tied to the run's backend and split),
    ``report.json`` and ``val_predictions.csv``. Returns the final metrics."""
    return _train(spec, segmenter, sink)


def _train(spec: TrialSpec, segmenter: Segmenter, sink: ResultSink) -> dict[str, float]:
    from orchestrator.training.loop import tensorboard_writer

    run, paths = spec.run, spec.paths
    cfg = run.reward_net
    writer = tensorboard_writer(sink.trial_dir)
    examples = {}
    for split in ("train", "val"):
        samples = load_split(spec.data, split, cfg.max_images)
        examples[split] = examples_for(run, samples, segmenter)

    def on_epoch(epoch: int, val_mae: float) -> None:
        writer.add_scalar(mk.REWARD_NET_VAL_MAE, val_mae, global_step=epoch)
        export_progress(spec.trial.name, {mk.REWARD_NET_VAL_MAE: val_mae})
        sink.report({mk.REWARD_NET_EPOCH: float(epoch), mk.REWARD_NET_VAL_MAE: val_mae})

    from orchestrator.gpu.devices import trial_torch_device

    device = trial_torch_device(spec.gpu_mem_mb)
    model, report = fit(run, examples["train"], examples["val"], on_epoch=on_epoch, device=device)
    writer.close()
    inject_fault(paths.reward_net)
    reward_net.save_checkpoint(
        paths.reward_net,
        model,
        {
            "input_size": cfg.input_size,
            "backend_id": spec.backend_id,
            "manifest_hash": spec.manifest_hash,
            "report": json.dumps(report.to_dict()),
        },
    )
    run_dir.write_json(paths.reward_net_report, report.to_dict())
    _save_val_predictions(paths, model, examples["val"])
    dice = report.targets["dice"]
    metrics = {
        mk.REWARD_NET_EPOCH: float(cfg.epochs),
        mk.REWARD_NET_VAL_MAE: dice.mae,
        mk.REWARD_NET_VAL_SPEARMAN: dice.spearman,
        mk.REWARD_NET_MEAN_PREDICTOR_MAE: dice.mean_predictor_mae,
    }
    sink.report(metrics)
    return metrics


def _save_val_predictions(paths: RunPaths, model: RewardNet, val: list[RewardExample]) -> None:
    """The validation predictions behind ``report.json``, for the report's scatter plot."""
    x = torch.from_numpy(np.stack([e.x for e in val]))
    predictions = RewardNetPredictions(
        [e.image_id for e in val], reward_net.predict(model, x), np.stack([e.y for e in val])
    )
    write_reward_net_predictions(paths.reward_net_predictions, predictions)
