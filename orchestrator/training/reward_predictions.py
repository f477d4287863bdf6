"""The reward net's validation predictions (``reward_net/val_predictions.csv``): written by
the reward-net trial, read by the report's scatter plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.reward_net import TARGETS
from orchestrator import run_dir


class RewardNetPredictions(NamedTuple):
    """Validation examples of the reward net: ids, predicted and true (N, 3) targets, with
    columns in :data:`models.reward_net.TARGETS` order (dice, recall, precision)."""

    image_ids: list[str]
    predicted: np.ndarray
    true: np.ndarray


def write_reward_net_predictions(path: Path, predictions: RewardNetPredictions) -> None:
    """``image_id, predicted_<t>, true_<t>`` per validation example (floats as ``repr``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["image_id", *[f"{kind}_{t}" for t in TARGETS for kind in ("predicted", "true")]]
    )
    for i, image_id in enumerate(predictions.image_ids):
        values = [
            repr(float(array[i, j]))
            for j in range(len(TARGETS))
            for array in (predictions.predicted, predictions.true)
        ]
        writer.writerow([image_id, *values])
    run_dir.write_text(path, buffer.getvalue())


def read_reward_net_predictions(path: Path) -> RewardNetPredictions:
    """What :func:`write_reward_net_predictions` wrote."""
    with path.open(newline="") as handle:
        records = list(csv.DictReader(handle))

    def column(kind: str) -> np.ndarray:
        return np.array(
            [[float(r[f"{kind}_{t}"]) for t in TARGETS] for r in records], dtype=np.float64
        ).reshape(len(records), len(TARGETS))

    return RewardNetPredictions(
        [r["image_id"] for r in records], column("predicted"), column("true")
    )
