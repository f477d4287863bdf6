"""The ``finetune`` experiment's trials: the backend's mask head fine-tuned on the training
images, against the reward net (``reward_finetune``) or the labels (``supervised_finetune``).

Both trials run the same recipe (``config.finetune``) over the backend's
:class:`~models.heads.HeadBackend` as the run's workers serve it
(:class:`~orchestrator.inference.heads.WorkerHeadBackend`: the model stays in the workers), on
the default prompt's frozen inputs of the train split, computed once per image; an image whose
answer has no ``[SEG]`` token (Sa2VA) gives the head no gradient and is left out of training:

- ``reward_finetune`` waits for the reward-net trial to be READY on the run's status board
  (``after``; it stops at once, with the reason, when that trial FAILED), then maximises the
  reward net's predicted quality with the method ``finetune.method`` names
  (:mod:`models.head_training`), never reading a training label; the kept head is the
  evaluation with the best reward-net score on the val images (no labels);
- ``supervised_finetune`` trains the same head with the labels (the honest reference of what
  labels give); the kept head is the evaluation with the best val Dice.

Every ``finetune.eval_every`` steps both log ``custom/reward_net_score`` (where the reward net
is ready) and ``custom/gt_dice`` (val; a reference only) to TensorBoard and the sink. Outputs,
under ``RUN/finetune/<trial>/``: ``model/`` (the exported model, which ``--model-path``
accepts: for Sa2VA a whole checkpoint folder, the size of the base), ``head_state.pt`` (the kept
head's float32 state dict: the run's evaluation applies it to frozen inputs from the workers
instead of loading the export) and ``history.json`` (the evaluations along training: the
reward-hacking curve, the kept step, the reward net's error on the head's masks and on the prompt
masks, CPU seconds).
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
from orchestrator.experiments import TrialSpec, run_reward_scorer
from orchestrator.run_dir import RunPaths
from orchestrator.training.progress_metrics import export_progress
from orchestrator.training.trial_status import wait_for

if TYPE_CHECKING:
    from models.heads import HeadBackend
    from orchestrator.training.loop import ResultSink

FINETUNE_DIR, MODEL_DIR, HISTORY_FILE = "finetune", "model", "history.json"
HEAD_STATE_FILE = "head_state.pt"


def trial_dir(paths: RunPaths, trial: str) -> Path:
    """``RUN/finetune/<trial>``: the trial's exported head and history."""
    return paths.root / FINETUNE_DIR / trial


def model_dir(paths: RunPaths, trial: str) -> Path:
    """The exported head of ``trial`` (a folder ``--model-path`` accepts)."""
    return trial_dir(paths, trial) / MODEL_DIR


def head_state_file(paths: RunPaths, trial: str) -> Path:
    """The kept head's state dict of ``trial`` (what the run's evaluation applies)."""
    return trial_dir(paths, trial) / HEAD_STATE_FILE


def head_backend(segmenter: Segmenter) -> HeadBackend:
    """The run's head backend: its worker pool's (``segmenter`` is the trial's client)."""
    from orchestrator.inference.client import SegmentationClient
    from orchestrator.inference.heads import WorkerHeadBackend

    if not isinstance(segmenter, SegmentationClient):
        raise TypeError(f"fine-tuning needs the run's SegmentationClient, got {segmenter!r}")
    return WorkerHeadBackend(segmenter)


def head_examples(
    backend: HeadBackend,
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


def trainable(examples: Sequence[HeadExample]) -> list[HeadExample]:
    """The examples a head can learn from: those whose answer has a ``[SEG]`` token (a head
    gives a constant empty mask without one, and no gradient)."""
    return [e for e in examples if int(e.inputs.meta.get("seg_tokens", 1)) > 0]


def run_finetune(spec: TrialSpec, segmenter: Segmenter, sink: ResultSink) -> dict[str, float]:
    """The trial of ``spec`` (see the module docstring); returns its final metrics."""
    from orchestrator.training.loop import tensorboard_writer

    started = time.process_time()
    run, cfg = spec.run, spec.run.finetune
    backend = head_backend(segmenter)
    scorer = _reward_scorer(spec)
    net = None if scorer is None else _frozen(scorer.model)
    size = run.reward_net.input_size if scorer is None else scorer.input_size
    by_labels = spec.trial.head_objective == "labels"
    prompt = run.env.default_prompt
    samples = load_split(spec.data, "train", cfg.max_images)
    train = trainable(head_examples(backend, samples, prompt, size, by_labels))
    if not train:
        raise UserError(
            f"{spec.name}: none of the {len(samples)} training images has a [SEG] token "
            f"in the answer to the default prompt {prompt!r}, so the head has nothing to learn "
            "from; choose another env.default_prompt"
        )
    val = head_examples(backend, load_split(spec.data, "val", cfg.max_images), prompt, size, True)
    device = _device(spec)
    head: Any = backend.initial_head()
    head.to(device)
    if net is not None:
        net.to(device)
    writer = tensorboard_writer(sink.trial_dir)
    weight = run.env.recall_weight

    def evaluate(step: int) -> EvalPoint:
        point = evaluate_head(head, val, head.segmentation, net, weight, step)
        metrics = {mk.FINETUNE_STEP: float(step)}
        if not math.isnan(point.reward_net_score):
            metrics[mk.REWARD_NET_SCORE] = point.reward_net_score
        if not math.isnan(point.gt_dice):
            metrics[mk.GT_DICE] = point.gt_dice
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()
        export_progress(spec.name, metrics)
        sink.report(metrics)
        return point

    def on_step(step: int, loss: float) -> None:
        writer.add_scalar(mk.FINETUNE_LOSS, loss, global_step=step)

    seed = cfg.seed + spec.seed
    settings = TrainSettings(cfg.steps, cfg.batch_images, cfg.lr, cfg.eval_every, seed)
    result = train_head(
        head, train, _objective(spec, net), settings, evaluate, _select(by_labels), on_step
    )
    head.load_state_dict(result.state)
    head.to("cpu").eval()
    writer.close()
    provenance = _provenance(spec, cfg, result.selected_step, len(train))
    exported = backend.export(head, model_dir(spec.paths, spec.name), provenance)
    _save_state(head, head_state_file(spec.paths, spec.name))
    history = {
        "trial": spec.name,
        "seed": seed,
        "objective": spec.trial.head_objective,
        "method": "labels" if by_labels else cfg.method,
        "points": [p.to_dict() for p in result.history],
        "selected_step": result.selected_step,
        "prompt_mask_mae": _prompt_mask_mae(scorer, val, head),
        "train_images": len(train),
        "train_images_without_seg": len(samples) - len(train),
        "val_images": len(val),
        "cpu_seconds": round(time.process_time() - started, 2),
        "model": str(exported),
    }
    run_dir.write_json(trial_dir(spec.paths, spec.name) / HISTORY_FILE, history)
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
        generator = torch.Generator().manual_seed(cfg.seed + spec.seed)
        return RewardPolicyGradient(net, weight, cfg.kl_weight, cfg.pg_samples, generator)
    return RewardGradient(net, weight, cfg.kl_weight)


def _select(by_labels: bool) -> Any:
    """The evaluation score a trial keeps the best head by (no labels for the reward one)."""
    if by_labels:
        return lambda point: point.gt_dice
    return lambda point: point.reward_net_score


def _device(spec: TrialSpec) -> str:
    from orchestrator.gpu.devices import trial_torch_device

    return trial_torch_device(spec.gpu_mem_mb)


def _save_state(head: Any, path: Path) -> None:
    """The head's state dict, written beside and renamed into place (never half-written)."""
    staging = path.with_name(f".{path.name}.partial")
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, staging)
    staging.replace(path)


def _provenance(spec: TrialSpec, cfg: Any, selected_step: int, images: int) -> dict[str, Any]:
    reward_net = spec.paths.reward_net if spec.trial.needs_reward_net else None
    return {
        "trial": spec.name,
        "seed": cfg.seed + spec.seed,
        "run_id": spec.run_id,
        "train_images": images,
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


def _prompt_mask_mae(scorer: RewardScorer | None, val: Sequence[HeadExample], head: Any) -> float:
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
        mask = head.segmentation(prob, example.inputs).mask
        x = np.stack([example.image_x, mask_channel(mask, scorer.input_size)])
        with torch.no_grad():
            predicted = float(scorer.model(torch.from_numpy(x)[None].to(device))[0, 0])
        errors.append(abs(predicted - mask_metrics(mask, example.truth).dice))
    return float(np.mean(errors))
