"""Fine-tuning a mask head (:mod:`models.heads`): the objectives and the loop, Ray-free.

Objectives (:class:`HeadObjective`), each a loss over one batch of head logits:

- :class:`RewardGradient`: minus the reward net's predicted quality of the head's **soft** mask
  (area-resized as the reward net's input, :func:`reward_scores`), differentiated through the
  frozen reward net, plus ``kl_weight`` x the mean per-pixel KL(head || initial head);
- :class:`RewardPolicyGradient`: per-pixel REINFORCE (RL4Seg's kind of update): ``samples``
  hard masks drawn pixel by pixel from the head, each scored by the reward net, advantage =
  score minus the image's mean score, times the mean per-pixel log-probability; same KL term;
- :class:`LabelLoss`: binary cross-entropy plus soft-Dice loss against the ground truth (the
  supervised reference).

The two reward objectives never read ``HeadExample.truth``; only :class:`LabelLoss` and the
reference metrics of :func:`evaluate_head` do (``custom/gt_dice``: reported, never selected on
by the reward objectives).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from models.heads import FrozenInputs
from models.metrics import mask_metrics
from models.reward_net import RewardNet
from models.segmentation import Segmentation

HardMask = Callable[[np.ndarray, FrozenInputs], Segmentation]
"""The backend's rule from a soft mask to its segmentation (e.g. Frangi's
:func:`~models.frangi_head.head_segmentation`)."""


@dataclass(frozen=True)
class HeadExample:
    """One (image, prompt) to train or select on.

    Attributes:
        image_id: the image's id.
        inputs: the backend's frozen inputs.
        image_x: the reward net's image channel (:func:`models.reward_net.image_channel`).
        truth: the ground truth, or ``None``: the reward objectives never read it.
    """

    image_id: str
    inputs: FrozenInputs
    image_x: np.ndarray
    truth: np.ndarray | None = None


class BatchHead(Protocol):
    """A head that maps a batch of frozen inputs to logits (N, H, W)."""

    def batch_logits(self, batch: Sequence[FrozenInputs]) -> torch.Tensor: ...


def reward_scores(
    net: RewardNet, image_x: torch.Tensor, prob: torch.Tensor, recall_weight: float
) -> torch.Tensor:
    """``(1 - w) * dice + w * recall`` the reward net predicts for soft masks ``prob`` (N, H, W)
    on images ``image_x`` (N, S, S); differentiable in ``prob``. The mask is area-resized to
    S x S as :func:`models.reward_net.mask_channel` does (equal when S divides H and W)."""
    side = (int(image_x.shape[-2]), int(image_x.shape[-1]))
    mask_x = F.adaptive_avg_pool2d(prob[:, None], side)
    out = net(torch.cat([image_x[:, None], mask_x], dim=1))
    return (1 - recall_weight) * out[:, 0] + recall_weight * out[:, 1]


def soft_dice_loss(prob: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``1 - soft Dice`` of soft masks ``prob`` against ``truth``
    (both (N, H, W); +1 in the denominator keeps empty masks finite)."""
    overlap = (prob * truth).sum(dim=(1, 2))
    dice = 2 * overlap / (prob.sum(dim=(1, 2)) + truth.sum(dim=(1, 2)) + 1.0)
    return (1 - dice).mean()


def bernoulli_kl(prob: torch.Tensor, start: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean per-pixel KL(Bernoulli(prob) || Bernoulli(start))."""
    p, q = prob.clamp(eps, 1 - eps), start.clamp(eps, 1 - eps)
    return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()


class HeadObjective(Protocol):
    """A loss over one batch: ``logits`` (N, H, W) of the head, ``start`` (N, H, W) the initial
    head's soft masks, ``image_x`` (N, S, S) the reward net's image channels."""

    uses_labels: bool

    def loss(
        self,
        logits: torch.Tensor,
        start: torch.Tensor,
        image_x: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> torch.Tensor: ...


@dataclass
class RewardGradient:
    """Minus the reward net's score of the soft mask, plus the KL proximity term."""

    net: RewardNet
    recall_weight: float = 0.0
    kl_weight: float = 1.0
    uses_labels: bool = False

    def loss(
        self,
        logits: torch.Tensor,
        start: torch.Tensor,
        image_x: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> torch.Tensor:
        prob = torch.sigmoid(logits)
        score = reward_scores(self.net, image_x, prob, self.recall_weight).mean()
        return -score + self.kl_weight * bernoulli_kl(prob, start)


@dataclass
class RewardPolicyGradient:
    """Per-pixel REINFORCE with the reward net's score of sampled hard masks (see the module
    docstring), plus the KL proximity term."""

    net: RewardNet
    recall_weight: float = 0.0
    kl_weight: float = 1.0
    samples: int = 4
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    uses_labels: bool = False

    def loss(
        self,
        logits: torch.Tensor,
        start: torch.Tensor,
        image_x: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> torch.Tensor:
        prob = torch.sigmoid(logits)
        n = len(logits)
        with torch.no_grad():
            draws = torch.rand((self.samples, *prob.shape), generator=self.generator)
            masks = (draws.to(prob.device) < prob.detach()).float()
            scores = reward_scores(
                self.net,
                image_x.repeat(self.samples, 1, 1),
                masks.reshape(-1, *prob.shape[1:]),
                self.recall_weight,
            ).reshape(self.samples, n)
            advantage = scores - scores.mean(dim=0, keepdim=True)
        log_prob = -F.binary_cross_entropy_with_logits(
            logits.expand_as(masks), masks, reduction="none"
        ).mean(dim=(2, 3))
        return -(advantage * log_prob).mean() + self.kl_weight * bernoulli_kl(prob, start)


@dataclass
class LabelLoss:
    """Binary cross-entropy plus soft-Dice loss against the labels (the supervised head)."""

    uses_labels: bool = True

    def loss(
        self,
        logits: torch.Tensor,
        start: torch.Tensor,
        image_x: torch.Tensor,
        truth: torch.Tensor | None,
    ) -> torch.Tensor:
        if truth is None:
            raise ValueError("the supervised head needs labelled images")
        bce = F.binary_cross_entropy_with_logits(logits, truth)
        return bce + soft_dice_loss(torch.sigmoid(logits), truth)


@dataclass(frozen=True)
class EvalPoint:
    """The head on the selection images after ``step`` steps.

    Attributes:
        step: optimiser steps taken.
        reward_net_score: the reward net's mean score of the head's soft masks (NaN without a
            reward net).
        gt_dice: mean ground-truth Dice of the head's hard masks (reference only; NaN without
            labels).
        reward_net_mae: mean |reward net's predicted Dice - true Dice| of those masks (NaN
            without labels or reward net).
    """

    step: int
    reward_net_score: float
    gt_dice: float
    reward_net_mae: float

    def to_dict(self) -> dict[str, float]:
        return {
            "step": self.step,
            "reward_net_score": self.reward_net_score,
            "gt_dice": self.gt_dice,
            "reward_net_mae": self.reward_net_mae,
        }


def evaluate_head(
    head: BatchHead,
    examples: Sequence[HeadExample],
    hard_mask: HardMask,
    net: RewardNet | None,
    recall_weight: float,
    step: int,
    batch_size: int = 8,
) -> EvalPoint:
    """Reward-net score, GT Dice and the reward net's Dice error of the head on ``examples``."""
    scores, predicted, dice = [], [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            part = examples[i : i + batch_size]
            prob = torch.sigmoid(head.batch_logits([e.inputs for e in part]))
            if net is not None:
                image_x = torch.from_numpy(np.stack([e.image_x for e in part])).to(prob.device)
                scores += reward_scores(net, image_x, prob, recall_weight).tolist()
                predicted += reward_scores(net, image_x, prob, 0.0).tolist()
            for example, one in zip(part, prob.cpu().numpy(), strict=True):
                if example.truth is not None:
                    mask = hard_mask(one.astype(np.float32), example.inputs).mask
                    dice.append(mask_metrics(mask, example.truth).dice)
    nan = math.nan
    score = float(np.mean(scores)) if scores else nan
    gt_dice = float(np.mean(dice)) if len(dice) == len(examples) and dice else nan
    mae = float(np.mean(np.abs(np.array(predicted) - dice))) if predicted and dice else nan
    if len(dice) != len(examples):
        mae = nan
    return EvalPoint(step, score, gt_dice, mae)


@dataclass(frozen=True)
class TrainSettings:
    """``steps`` Adam steps at ``lr`` on ``batch_images`` random training images each; the head
    is evaluated every ``eval_every`` steps (and at steps 0 and ``steps``)."""

    steps: int
    batch_images: int
    lr: float
    eval_every: int
    seed: int = 0


@dataclass
class TrainResult:
    """The kept head's state (the best evaluation by ``select``), its step, and every
    evaluation (the reward-hacking curve)."""

    state: dict[str, Any]
    selected_step: int
    history: list[EvalPoint]


def train_head(
    head: torch.nn.Module,
    train: Sequence[HeadExample],
    objective: HeadObjective,
    settings: TrainSettings,
    evaluate: Callable[[int], EvalPoint],
    select: Callable[[EvalPoint], float],
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune ``head`` (it must also be a :class:`BatchHead`) on ``train`` with
    ``objective``; ``evaluate(step)`` measures it, ``select`` scores an evaluation (higher is
    kept). Labels reach the objective only when ``objective.uses_labels``. Deterministic for a
    seed on one machine and thread count."""
    batch_head: Any = head
    generator = np.random.default_rng(settings.seed)
    optimiser = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], settings.lr)
    device = next(head.parameters()).device
    history = [evaluate(0)]
    best, best_state = history[0], copy.deepcopy(head.state_dict())
    for step in range(1, settings.steps + 1):
        picks = generator.choice(len(train), min(settings.batch_images, len(train)), replace=False)
        batch = [train[int(i)] for i in picks]
        head.train()
        logits = batch_head.batch_logits([e.inputs for e in batch])
        start = torch.stack([e.inputs.tensors["prob"] for e in batch]).to(device)
        image_x = torch.from_numpy(np.stack([e.image_x for e in batch])).to(device)
        truth = None
        if objective.uses_labels:
            truth = torch.from_numpy(np.stack([_truth(e) for e in batch])).float().to(device)
        loss = objective.loss(logits, start, image_x, truth)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
        if step % settings.eval_every == 0 or step == settings.steps:
            head.eval()
            point = evaluate(step)
            history.append(point)
            if select(point) > select(best):
                best, best_state = point, copy.deepcopy(head.state_dict())
    return TrainResult(best_state, best.step, history)


def _truth(example: HeadExample) -> np.ndarray:
    if example.truth is None:
        raise ValueError(f"image {example.image_id} has no label; the supervised head needs one")
    return example.truth
