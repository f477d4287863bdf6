"""How well the reward network predicts its targets: MAE, Pearson and Spearman per target next
to the mean predictor, and the within-image Spearman (how well it ranks one image's masks, which
is what the reward-guided PPO relies on)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

TARGETS = ("dice", "recall", "precision")
"""What the network predicts, in its output order."""


@dataclass(frozen=True)
class TargetReport:
    """Validation quality of one predicted target, next to the mean-predictor baseline.

    ``within_image_spearman`` is the mean over validation images of the Spearman correlation
    between predicted and true values of that image's masks (images whose true values are all
    equal are left out; 0.0 when none is left). The mean predictor is a constant: it has no rank
    order, so its Spearman and within-image Spearman are 0 by convention.
    """

    mae: float
    pearson: float
    spearman: float
    mean_predictor_mae: float
    within_image_spearman: float = 0.0
    mean_predictor_spearman: float = 0.0


@dataclass(frozen=True)
class RewardNetReport:
    """What ``train_reward_net`` measured on the validation examples (of its best epoch)."""

    n_train: int
    n_val: int
    epochs: int
    targets: dict[str, TargetReport]
    best_epoch: int = 0
    n_val_images: int = 0

    def beats_mean_predictor(self, target: str = "dice") -> bool:
        """Lower MAE and higher Spearman than predicting the training mean."""
        t = self.targets[target]
        return t.mae < t.mean_predictor_mae and t.spearman > t.mean_predictor_spearman

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A human-readable table: one line per target, model vs mean predictor."""
        lines = [
            f"reward net: {self.n_train} train / {self.n_val} val examples "
            f"({self.n_val_images} val images), best epoch {self.best_epoch} of {self.epochs}",
            f"  {'target':9s} {'MAE':>7s} {'(mean)':>8s} {'Pearson':>8s} {'Spearman':>9s} "
            f"{'within-image Spearman':>22s}",
        ]
        for name, t in self.targets.items():
            lines.append(
                f"  {name:9s} {t.mae:7.4f} {t.mean_predictor_mae:8.4f} {t.pearson:+8.3f} "
                f"{t.spearman:+9.3f} {t.within_image_spearman:+22.3f}"
            )
        lines.append(
            "  (mean) = MAE of always predicting the training mean; its correlations are 0"
        )
        return "\n".join(lines)


def _correlation(fn: Callable[..., Any], a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    value = float(fn(a, b).statistic)
    return 0.0 if math.isnan(value) else value


def within_group_spearman(
    predicted: np.ndarray, true: np.ndarray, groups: Sequence[str] | np.ndarray
) -> float:
    """Mean Spearman of ``predicted`` vs ``true`` inside each group (an image's masks); groups
    with fewer than two examples or a constant ``true`` are skipped; 0.0 if none is left."""
    keys = np.asarray(groups)
    values = []
    for key in dict.fromkeys(keys.tolist()):
        rows = keys == key
        if rows.sum() >= 2 and np.ptp(true[rows]) > 0:
            values.append(_correlation(stats.spearmanr, predicted[rows], true[rows]))
    return float(np.mean(values)) if values else 0.0


def evaluate_predictions(
    predicted: np.ndarray,
    true: np.ndarray,
    train_mean: np.ndarray,
    image_ids: Sequence[str] | None = None,
) -> dict[str, TargetReport]:
    """Per-target (columns in :data:`TARGETS` order) MAE, Pearson and Spearman, the MAE of
    always predicting ``train_mean``, and with ``image_ids`` the within-image Spearman."""
    reports = {}
    for i, name in enumerate(TARGETS):
        p, t = predicted[:, i], true[:, i]
        within = 0.0 if image_ids is None else within_group_spearman(p, t, image_ids)
        reports[name] = TargetReport(
            mae=float(np.mean(np.abs(p - t))),
            pearson=_correlation(stats.pearsonr, p, t),
            spearman=_correlation(stats.spearmanr, p, t),
            mean_predictor_mae=float(np.mean(np.abs(train_mean[i] - t))),
            within_image_spearman=within,
        )
    return reports
