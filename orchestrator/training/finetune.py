"""The ``finetune`` experiment's trials: the backend's mask head fine-tuned on the training
images, against the reward net (``reward_finetune``) or the labels (``supervised_finetune``).

Both trials run the same recipe (``config.finetune``) over the backend's
:class:`~models.heads.HeadBackend` (:func:`head_backend`), on the default prompt's frozen
inputs of the train split (computed once through the run's workers, so from their cache):

- ``reward_finetune`` waits for the reward-net trial to be READY on the run's status board
  (``after``; it stops at once, with the reason, when that trial FAILED), then maximises the
  reward net's predicted quality with the method ``finetune.method`` names
  (:mod:`models.head_training`), never reading a training label; the kept head is the
  evaluation with the best reward-net score on the val images (no labels);
- ``supervised_finetune`` trains the same head with the labels (the honest reference of what
  labels give); the kept head is the evaluation with the best val Dice.

Every ``finetune.eval_every`` steps both log ``custom/reward_net_score`` (where the reward net
is ready) and ``custom/gt_dice`` (val; a reference only) to TensorBoard and the sink. Outputs,
under ``RUN/finetune/<trial>/``: ``model/`` (the exported head, which ``--model-path`` accepts)
and ``history.json`` (the evaluations along training: the reward-hacking curve, the kept step,
the reward net's error on the head's masks and on the prompt masks, CPU seconds).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from envs.sample import Sample
from envs.sources import load_split
from models.errors import UserError
from models.head_training import (
    EvalPoint,
    HeadExample,
    HeadObjective,
    LabelLoss,
    RewardGradient,
    RewardPolicyGradient,
    TrainSettings,
    evaluate_head,
    train_head,
)
from models.metrics import mask_metrics
from models.reward_net import RewardNet, RewardScorer, image_channel, mask_channel
from models.segmentation import Segmenter
from orchestrator import metric_keys as mk
from orchestrator import run_dir
from orchestrator.config import RunConfig
from orchestrator.experiments import TrialSpec, run_reward_scorer
from orchestrator.run_dir import RunPaths
from orchestrator.training.progress_metrics import export_progress
from orchestrator.training.trial_status import wait_for

if TYPE_CHECKING:
    from models.frangi_head import FrangiHeadBackend
    from orchestrator.training.loop import ResultSink

FINETUNE_DIR, MODEL_DIR, HISTORY_FILE = "finetune", "model", "history.json"


def trial_dir(paths: RunPaths, trial: str) -> Path:
    """``RUN/finetune/<trial>``: the trial's exported head and history."""
    return paths.root / FINETUNE_DIR / trial


def model_dir(paths: RunPaths, trial: str) -> Path:
    """The exported head of ``trial`` (a folder ``--model-path`` accepts)."""
    return trial_dir(paths, trial) / MODEL_DIR


def head_backend(config: RunConfig, segmenter: Segmenter) -> FrangiHeadBackend:
    """The run's head backend over its (cache-backed) segmenter; a ``UserError`` for a backend
    that has none here."""
    from models.frangi_head import FrangiHeadBackend

    if config.backend.name != "frangi" or not segmenter.backend_id.startswith("frangi:"):
        raise UserError(
            f"the finetune experiment fine-tunes the plain Frangi backend's head here, but the "
            f"run's backend is {segmenter.backend_id}; run it with backend.name: frangi and no "
            "backend.model_path, or leave finetune out of `experiments`"
        )
    return FrangiHeadBackend(segmenter)


def head_examples(
    backend: FrangiHeadBackend,
    samples: Sequence[Sample],
    prompt: str,
    input_size: int,
    labels: bool,
) -> list[HeadExample]:
    """The frozen inputs of ``prompt`` on ``samples``; the ground truth is kept only when
    ``labels`` (and the sample has one)."""
    return [
        HeadExample(
            sample.id,
            backend.frozen_inputs(sample.image, [prompt])[0],
            image_channel(sample.image, input_size),
            sample.mask if labels else None,
        )
        for sample in samples
    ]


def run_finetune(spec: TrialSpec, segmenter: Segmenter, sink: ResultSink) -> dict[str, float]:
    """The trial of ``spec`` (see the module docstring); returns its final metrics."""
    from orchestrator.training.loop import tensorboard_writer

    started = time.process_time()
    run, cfg = spec.run, spec.run.finetune
    backend = head_backend(run, segmenter)
    scorer = _reward_scorer(spec)
    net = None if scorer is None else _frozen(scorer.model)
    size = run.reward_net.input_size if scorer is None else scorer.input_size
    by_labels = spec.trial.head_objective == "labels"
    prompt = run.env.default_prompt
    train = head_examples(
        backend, load_split(spec.data, "train", cfg.max_images), prompt, size, by_labels
    )
    val = head_examples(backend, load_split(spec.data, "val", cfg.max_images), prompt, size, True)
    device = _device(spec)
    head = backend.initial_head().to(device)
    if net is not None:
        net.to(device)
    writer = tensorboard_writer(sink.trial_dir)
    weight = run.env.recall_weight

    def evaluate(step: int) -> EvalPoint:
        point = evaluate_head(head, val, backend.segmentation, net, weight, step)
        metrics = {mk.FINETUNE_STEP: float(step)}
        if not math.isnan(point.reward_net_score):
            metrics[mk.REWARD_NET_SCORE] = point.reward_net_score
        if not math.isnan(point.gt_dice):
            metrics[mk.GT_DICE] = point.gt_dice
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()
        export_progress(spec.trial.name, metrics)
        sink.report(metrics)
        return point

    def on_step(step: int, loss: float) -> None:
        writer.add_scalar(mk.FINETUNE_LOSS, loss, global_step=step)

    settings = TrainSettings(cfg.steps, cfg.batch_images, cfg.lr, cfg.eval_every, cfg.seed)
    result = train_head(
        head, train, _objective(spec, net), settings, evaluate, _select(by_labels), on_step
    )
    head.load_state_dict(result.state)
    head.to("cpu").eval()
    writer.close()
    exported = backend.export(
        head, model_dir(spec.paths, spec.trial.name), _provenance(spec, cfg, result.selected_step)
    )
    history = {
        "trial": spec.trial.name,
        "objective": spec.trial.head_objective,
        "method": "labels" if by_labels else cfg.method,
        "points": [p.to_dict() for p in result.history],
        "selected_step": result.selected_step,
        "prompt_mask_mae": _prompt_mask_mae(scorer, val, backend),
        "train_images": len(train),
        "val_images": len(val),
        "cpu_seconds": round(time.process_time() - started, 2),
        "model": str(exported),
    }
    run_dir.write_json(trial_dir(spec.paths, spec.trial.name) / HISTORY_FILE, history)
    kept = next(p for p in result.history if p.step == result.selected_step)
    final = {mk.FINETUNE_STEP: float(kept.step)}
    if not math.isnan(kept.gt_dice):
        final[mk.GT_DICE] = kept.gt_dice
    if not math.isnan(kept.reward_net_score):
        final[mk.REWARD_NET_SCORE] = kept.reward_net_score
    sink.report(final)
    return final


def _reward_scorer(spec: TrialSpec) -> RewardScorer | None:
    """The run's reward net: awaited (``Trial.after``) by a trial that needs it; used for the
    reference score by one that does not, when its checkpoint is already written."""
    if spec.trial.needs_reward_net:
        wait_for(spec)
        return run_reward_scorer(spec)
    if spec.paths.reward_net.is_file():
        try:
            return run_reward_scorer(spec)
        except UserError:
            return None
    return None


def _frozen(net: RewardNet) -> RewardNet:
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.eval()


def _objective(spec: TrialSpec, net: RewardNet | None) -> HeadObjective:
    cfg, weight = spec.run.finetune, spec.run.env.recall_weight
    if spec.trial.head_objective == "labels":
        return LabelLoss()
    assert net is not None, "the reward objective waited for the reward net"
    if cfg.method == "policy_gradient":
        generator = torch.Generator().manual_seed(cfg.seed)
        return RewardPolicyGradient(net, weight, cfg.kl_weight, cfg.pg_samples, generator)
    return RewardGradient(net, weight, cfg.kl_weight)


def _select(by_labels: bool) -> Any:
    """The evaluation score a trial keeps the best head by (no labels for the reward one)."""
    if by_labels:
        return lambda point: point.gt_dice
    return lambda point: point.reward_net_score


def _device(spec: TrialSpec) -> str:
    from orchestrator.gpu.budget import trial_torch_device

    return trial_torch_device(spec.gpu_mem_mb)


def _provenance(spec: TrialSpec, cfg: Any, selected_step: int) -> dict[str, Any]:
    reward_net = spec.paths.reward_net if spec.trial.needs_reward_net else None
    return {
        "trial": spec.trial.name,
        "objective": spec.trial.head_objective,
        "settings": cfg.model_dump(mode="json"),
        "selected_step": selected_step,
        "prompt": spec.run.env.default_prompt,
        "manifest_hash": spec.manifest_hash,
        "reward_net": None if reward_net is None else str(reward_net),
        "reward_net_sha256": None if reward_net is None else _sha256(reward_net),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prompt_mask_mae(
    scorer: RewardScorer | None, val: Sequence[HeadExample], backend: FrangiHeadBackend
) -> float:
    """The reward net's mean Dice error on the prompt's own hard masks of the val images (the
    masks the reward-guided trial scores), beside its error on the head's soft masks; NaN
    without labels or reward net."""
    if scorer is None or any(e.truth is None for e in val):
        return math.nan
    device = next(scorer.model.parameters()).device
    errors = []
    for example in val:
        assert example.truth is not None
        prob = example.inputs.tensors["prob"].numpy()
        mask = backend.segmentation(prob, example.inputs).mask
        x = np.stack([example.image_x, mask_channel(mask, scorer.input_size)])
        with torch.no_grad():
            predicted = float(scorer.model(torch.from_numpy(x)[None].to(device))[0, 0])
        errors.append(abs(predicted - mask_metrics(mask, example.truth).dice))
    return float(np.mean(errors))
