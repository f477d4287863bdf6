"""The reward network: a small CNN that scores an (image, mask) pair without ground truth.

It predicts the mask's Dice, Recall and Precision against the (unseen) ground truth, so the
reward-guided experiment can optimise prompts on unlabelled images. It is trained on the TRAIN
split from masks of every prompt and of post-processing sequences, validated on VAL, and always
compared with the trivial scorer that predicts the training mean: a reward net that cannot beat
that is noise, and the report says so.

Checkpoints are a plain ``{"state_dict", "metadata"}`` dict saved with ``torch.save`` and loaded
with ``torch.load(weights_only=True)``: no pickled code runs on load. The metadata ties a
checkpoint to its input size, the backend whose masks it learned (``backend_id``) and the split
it was trained on (``manifest_hash``); a mismatch is refused with the command that makes a
matching one.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from scipy import stats
from torch import nn

from models.errors import UserError
from models.metrics import mask_metrics

TARGETS = ("dice", "recall", "precision")
CHECKPOINT_VERSION = 1
HOW_TO_TRAIN = (
    "create one with `sa2va-rl train-reward-net --output DIR` (same data, backend and split as "
    "the run), or let `sa2va-rl run` train it as the reward experiment's first trial"
)


class RewardPrediction(NamedTuple):
    """Predicted quality of a mask, each in [0, 1]."""

    dice: float
    recall: float
    precision: float


class RewardExample(NamedTuple):
    """One training pair: network input ``x`` (2xSxS float32) and targets ``y`` (dice, recall,
    precision) computed against the ground truth."""

    image_id: str
    x: np.ndarray
    y: np.ndarray


def make_input(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The network input: grey image and mask (bool or soft), area-resized to ``size``.

    Area interpolation keeps 1-px vessels as partial values instead of dropping them.
    """
    grey = image.mean(axis=2).astype(np.float32) / 255.0 if image.ndim == 3 else image / 255.0
    grey_small = cv2.resize(grey.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    mask_small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.stack([grey_small, mask_small]).astype(np.float32)


def make_example(
    image_id: str, image: np.ndarray, mask: np.ndarray, gt: np.ndarray, size: int
) -> RewardExample:
    """A training example for ``mask`` scored against ``gt``."""
    metrics = mask_metrics(mask, gt)
    y = np.array([metrics.dice, metrics.recall, metrics.precision], dtype=np.float32)
    return RewardExample(image_id, make_input(image, mask, size), y)


class RewardNet(nn.Module):
    """Four stride-2 conv blocks, global average pooling, a 2-layer head, sigmoid outputs."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 2
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(channels, 64), nn.ReLU(inplace=True), nn.Linear(64, len(TARGETS))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.features(x)))


@dataclass(frozen=True)
class TargetReport:
    """Validation quality of one predicted target, next to the mean-predictor baseline."""

    mae: float
    pearson: float
    spearman: float
    mean_predictor_mae: float
    # A constant has no rank order: its Spearman and Pearson are 0 by convention.
    mean_predictor_spearman: float = 0.0


@dataclass(frozen=True)
class RewardNetReport:
    """What ``train_reward_net`` measured on the validation examples."""

    n_train: int
    n_val: int
    epochs: int
    targets: dict[str, TargetReport]

    def beats_mean_predictor(self, target: str = "dice") -> bool:
        t = self.targets[target]
        return t.mae < t.mean_predictor_mae and t.spearman > t.mean_predictor_spearman

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"reward net: {self.n_train} train / {self.n_val} val examples"]
        for name, t in self.targets.items():
            lines.append(
                f"  {name:9s} MAE {t.mae:.4f} (mean predictor {t.mean_predictor_mae:.4f})  "
                f"Pearson {t.pearson:+.3f}  Spearman {t.spearman:+.3f} (mean predictor 0)"
            )
        return "\n".join(lines)


def _correlation(fn: Callable[..., Any], a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    value = float(fn(a, b).statistic)
    return 0.0 if math.isnan(value) else value


def evaluate_predictions(
    predicted: np.ndarray, true: np.ndarray, train_mean: np.ndarray
) -> dict[str, TargetReport]:
    """Per-target MAE, Pearson and Spearman, and the MAE of always predicting ``train_mean``."""
    reports = {}
    for i, name in enumerate(TARGETS):
        p, t = predicted[:, i], true[:, i]
        reports[name] = TargetReport(
            mae=float(np.mean(np.abs(p - t))),
            pearson=_correlation(stats.pearsonr, p, t),
            spearman=_correlation(stats.spearmanr, p, t),
            mean_predictor_mae=float(np.mean(np.abs(train_mean[i] - t))),
        )
    return reports


def _stack(examples: Sequence[RewardExample]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([e.x for e in examples]))
    y = torch.from_numpy(np.stack([e.y for e in examples]))
    return x, y


def predict(model: RewardNet, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Model outputs for a batch of inputs, in eval mode, as a numpy (N, 3) array."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        parts = [
            model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts).numpy()


def train_reward_net(
    train: Sequence[RewardExample],
    val: Sequence[RewardExample],
    *,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[RewardNet, RewardNetReport]:
    """Fit the network with MSE on (dice, recall, precision); keep the epoch with the lowest
    validation MAE; report it against the mean predictor. ``on_epoch(epoch, val_mae)`` is called
    after every epoch (progress)."""
    if not train or not val:
        raise UserError(
            f"the reward net needs training and validation examples, got {len(train)} and "
            f"{len(val)}: use a dataset with more images (or groups) in the train and val splits"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = _stack(train)
    x_val, y_val = _stack(val)
    model = RewardNet().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    best_mae, best_state = math.inf, model.state_dict()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            loss = nn.functional.mse_loss(model(x_train[idx].to(device)), y_train[idx].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        val_mae = float(np.mean(np.abs(predict(model, x_val) - y_val.numpy())))
        if val_mae < best_mae:
            best_mae = val_mae
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(epoch, val_mae)
    model.load_state_dict(best_state)
    targets = evaluate_predictions(predict(model, x_val), y_val.numpy(), y_train.numpy().mean(0))
    return model, RewardNetReport(len(train), len(val), epochs, targets)


def save_checkpoint(path: str | Path, model: RewardNet, metadata: dict[str, Any]) -> Path:
    """Write ``{"state_dict", "metadata"}`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {"version": CHECKPOINT_VERSION, "targets": list(TARGETS), **metadata},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class RewardScorer:
    """A loaded reward network: ``score(image, mask)`` -> :class:`RewardPrediction`."""

    def __init__(self, model: RewardNet, metadata: dict[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.input_size = int(metadata["input_size"])

    def score(self, image: np.ndarray, mask: np.ndarray) -> RewardPrediction:
        x = torch.from_numpy(make_input(image, mask, self.input_size))[None]
        with torch.no_grad():
            out = self.model(x)[0].tolist()
        return RewardPrediction(*out)


def _mismatch(path: Path, key: str, found: Any, expected: Any) -> UserError:
    return UserError(
        f"reward-net checkpoint {path} was made for {key}={found!r}, but this run uses "
        f"{expected!r}; {HOW_TO_TRAIN}"
    )


def load_checkpoint(
    path: str | Path,
    *,
    backend_id: str | None = None,
    manifest_hash: str | None = None,
) -> RewardScorer:
    """Load a checkpoint with ``weights_only=True``; check it matches the run's backend and
    split when those are given. Every failure is a ``UserError`` that says how to make one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"reward-net checkpoint not found: {path}; {HOW_TO_TRAIN}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        metadata = dict(payload["metadata"])
        model = RewardNet()
        model.load_state_dict(payload["state_dict"])
        int(metadata["input_size"])
    except Exception as err:  # any failure to read is the same user-facing problem
        raise UserError(
            f"reward-net checkpoint {path} is corrupt or not a sa2va-rl reward net "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); {HOW_TO_TRAIN}"
        ) from None
    if metadata.get("version") != CHECKPOINT_VERSION:
        raise _mismatch(path, "version", metadata.get("version"), CHECKPOINT_VERSION)
    if backend_id is not None and metadata.get("backend_id") != backend_id:
        raise _mismatch(path, "backend_id", metadata.get("backend_id"), backend_id)
    if manifest_hash is not None and metadata.get("manifest_hash") != manifest_hash:
        raise _mismatch(path, "manifest_hash", metadata.get("manifest_hash"), manifest_hash)
    return RewardScorer(model, metadata)
