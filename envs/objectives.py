"""What an episode optimises: the objective whose change is the per-step reward.

Per-step reward = objective(after) - objective(before), so an episode's return is
objective(final mask) - objective(initial mask). Both objectives blend Dice and Recall the same way
(``(1 - w) * dice + w * recall``, since the users' goal names both), and differ only in where the
numbers come from:

- :class:`GroundTruthObjective` measures the mask against the ground truth (experiments 1 and 2);
- :class:`RewardNetObjective` asks the reward network, which never sees ground truth
  (experiment 3), so it runs on unlabelled data. Ground truth, where it exists, is only reported
  in ``info`` for reference.

:class:`NoObjective` scores nothing, for rollouts that only collect observations (the
observation statistics: what an env observes never depends on its objective).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from envs.sample import Sample
from models.errors import UserError
from models.metrics import mask_metrics
from models.reward_net import MaskScorer


class Evaluation(NamedTuple):
    """The objective's value for one mask, plus what to report in ``info``."""

    value: float
    info: dict[str, float]


class Objective(Protocol):
    """Scores a mask of a sample; ``needs_ground_truth`` says if unlabelled samples can be used."""

    needs_ground_truth: bool

    def evaluate(self, sample: Sample, mask: np.ndarray) -> Evaluation: ...


def blend(dice: float, recall: float, recall_weight: float) -> float:
    """``(1 - w) * dice + w * recall``: the one definition both objectives use."""
    return (1.0 - recall_weight) * dice + recall_weight * recall


def ground_truth_info(sample: Sample, mask: np.ndarray) -> dict[str, float]:
    """``gt_dice``/``gt_recall``/``gt_precision`` of ``mask``, or nothing without ground truth."""
    if sample.mask is None:
        return {}
    m = mask_metrics(mask, sample.mask)
    return {"gt_dice": m.dice, "gt_recall": m.recall, "gt_precision": m.precision}


def _check_weight(recall_weight: float) -> float:
    if not 0.0 <= recall_weight <= 1.0:
        raise UserError(f"recall_weight must be in [0, 1], got {recall_weight}")
    return float(recall_weight)


class GroundTruthObjective:
    """Dice (blended with Recall by ``recall_weight``) against the sample's ground truth."""

    needs_ground_truth = True

    def __init__(self, recall_weight: float = 0.0) -> None:
        self.recall_weight = _check_weight(recall_weight)

    def evaluate(self, sample: Sample, mask: np.ndarray) -> Evaluation:
        if sample.mask is None:
            raise UserError(
                f"image {sample.id} has no ground-truth mask, but this environment's reward is "
                "measured against ground truth; use RewardGuidedPrompt-v0 for unlabelled data"
            )
        info = ground_truth_info(sample, mask)
        return Evaluation(blend(info["gt_dice"], info["gt_recall"], self.recall_weight), info)


class RewardNetObjective:
    """The reward network's predicted Dice (blended with its predicted Recall): no ground truth."""

    needs_ground_truth = False

    def __init__(self, scorer: MaskScorer, recall_weight: float = 0.0) -> None:
        self.scorer = scorer
        self.recall_weight = _check_weight(recall_weight)

    def evaluate(self, sample: Sample, mask: np.ndarray) -> Evaluation:
        predicted = self.scorer.score(sample.image, mask)
        value = blend(predicted.dice, predicted.recall, self.recall_weight)
        info: dict[str, Any] = {"reward_net_score": value, **ground_truth_info(sample, mask)}
        return Evaluation(value, info)


class NoObjective:
    """Every mask scores 0 and ``info`` stays empty: no ground truth, no reward network."""

    needs_ground_truth = False

    def evaluate(self, sample: Sample, mask: np.ndarray) -> Evaluation:
        return Evaluation(0.0, {})
