"""The reward network: a small CNN that scores an (image, mask) pair without ground truth.

It predicts the mask's Dice, Recall and Precision against the (unseen) ground truth, so the
reward-guided experiment can optimise prompts on unlabelled images. It is trained on the TRAIN
split from masks of every prompt and of post-processing sequences, validated on VAL, and always
compared with the trivial scorer that predicts the training mean: a reward net that cannot beat
that is noise, and the report says so. Because the reward-guided PPO is rewarded by the *change*
of the score between masks of one image, the report also gives the mean Spearman correlation
within each validation image (how well it ranks the masks of one image).

Input: the grey image and the mask (hard or soft), each area-resized to ``input_size`` (so 1-px
vessels survive as partial values); the network adds the product of the two (the image seen
through the mask) itself. Training flips and transposes the inputs (the metrics do not change).

Checkpoints are a plain ``{"state_dict", "metadata"}`` dict saved with ``torch.save`` and loaded
with ``torch.load(weights_only=True)``: no pickled code runs on load. The metadata ties a
checkpoint to its format version, input size, network width, the backend whose masks it learned
(``backend_id``) and the split it was trained on (``manifest_hash``); a mismatch is refused with
the command that makes a matching one.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np
import torch
from torch import nn

from models.errors import UserError
from models.reward_metrics import TARGETS, RewardNetReport, evaluate_predictions
from models.segmentation import image_digest

CHECKPOINT_VERSION = 2
"""Bump whenever the architecture or the input changes: older checkpoints are then refused."""
DEFAULT_WIDTH = 16
HOW_TO_TRAIN = (
    "create a matching one with `sa2va-rl train-reward-net --output DIR` (built-in data) or "
    "`sa2va-rl train-reward-net --manifest RUN/split_manifest.json --config RUN/config.yaml "
    "--output DIR` (a run's data, split and backend), or let `sa2va-rl run` train it as the "
    "reward experiment's first trial"
)


class RewardPrediction(NamedTuple):
    """Predicted quality of a mask, each in [0, 1]."""

    dice: float
    recall: float
    precision: float


# ------------------------------------------------------------------------------------- inputs
def image_channel(image: np.ndarray, size: int) -> np.ndarray:
    """The image part of the input: grey in [0, 1], area-resized to ``size`` x ``size``."""
    if image.ndim == 3:
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    else:
        grey = image
    grey = grey.astype(np.float32) / 255.0
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)


def mask_channel(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask part of the input (bool or soft in [0, 1]), area-resized to ``size``."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def make_input(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The network input for one pair: float32 (2, size, size) = (grey image, mask)."""
    return np.stack([image_channel(image, size), mask_channel(mask, size)])


class RewardExample(NamedTuple):
    """One training pair, with targets ``y`` = (dice, recall, precision) against the ground truth.

    ``image_x`` is :func:`image_channel` of the image; the examples of one image share that
    array, so many masks per image cost one mask channel each. ``mask_x`` is
    :func:`mask_channel` of the mask.
    """

    image_id: str
    image_x: np.ndarray
    mask_x: np.ndarray
    y: np.ndarray

    @property
    def x(self) -> np.ndarray:
        """The network input, as :func:`make_input` builds it."""
        return np.stack([self.image_x, self.mask_x])


# ------------------------------------------------------------------------------------- network
class RewardNet(nn.Module):
    """Four stride-2 conv blocks, global average pooling, a 2-layer head, sigmoid outputs.

    Input (N, 2, S, S): grey image and mask; the first block also sees their product.
    Output (N, 3): predicted (dice, recall, precision).
    """

    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.width = width
        layers: list[nn.Module] = []
        channels = 3
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
        x = torch.cat([x, x[:, :1] * x[:, 1:2]], dim=1)
        return torch.sigmoid(self.head(self.features(x)))


# ------------------------------------------------------------------------------------ training
class _ExampleTensors:
    """Examples as tensors: each image channel stored once, one mask channel per example."""

    def __init__(self, examples: Sequence[RewardExample]) -> None:
        index: dict[int, int] = {}
        images: list[np.ndarray] = []
        rows = []
        for e in examples:
            key = id(e.image_x)
            if key not in index:
                index[key] = len(images)
                images.append(e.image_x)
            rows.append(index[key])
        self.images = torch.from_numpy(np.stack(images)[:, None])
        self.masks = torch.from_numpy(np.stack([e.mask_x for e in examples])[:, None])
        self.rows = torch.tensor(rows)
        self.y = torch.from_numpy(np.stack([e.y for e in examples]).astype(np.float32))
        self.image_ids = [e.image_id for e in examples]

    def __len__(self) -> int:
        return len(self.masks)

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.images[self.rows[idx]], self.masks[idx]], dim=1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip / transpose of the whole batch: Dice, Recall, Precision do not change."""
    flips = torch.randint(0, 2, (3,), generator=generator).tolist()
    if flips[0]:
        x = x.flip(2)
    if flips[1]:
        x = x.flip(3)
    return x.transpose(2, 3) if flips[2] else x


def predict(model: RewardNet, x: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Model outputs for a batch of inputs, in eval mode, as a numpy (N, 3) array."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        parts = [
            model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts).numpy()


def _predict_examples(model: RewardNet, data: _ExampleTensors, batch_size: int = 128) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(data)))
            parts.append(model(data.inputs(idx).to(device)).cpu())
    return torch.cat(parts).numpy()


def _train_epoch(
    model: RewardNet,
    data: _ExampleTensors,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """One pass over the shuffled examples (MSE on the three targets)."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(data), generator=generator)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) >= 2:  # BatchNorm needs two samples in training mode
            x = _augment(data.inputs(idx), generator).to(device)
            loss = nn.functional.mse_loss(model(x), data.y[idx].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        scheduler.step()


def train_reward_net(
    train: Sequence[RewardExample],
    val: Sequence[RewardExample],
    *,
    epochs: int = 12,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    width: int = DEFAULT_WIDTH,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[RewardNet, RewardNetReport]:
    """Fit the network with MSE on (dice, recall, precision), Adam with a one-cycle learning
    rate peaking at ``lr``, random flips; keep the epoch with the lowest validation MAE (mean
    over the three targets) and report it against the mean predictor.

    ``on_epoch(epoch, val_mae)`` is called after every epoch (progress). Deterministic for a
    seed on one machine and thread count.
    """
    if not train or not val:
        raise UserError(
            f"the reward net needs training and validation examples, got {len(train)} and "
            f"{len(val)}: use a dataset with more labelled images (or groups) in the train and "
            "val splits"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_data, val_data = _ExampleTensors(train), _ExampleTensors(val)
    model = RewardNet(width).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    best_mae, best_epoch, best_state = math.inf, 0, model.state_dict()
    for epoch in range(1, epochs + 1):
        _train_epoch(model, train_data, optimiser, scheduler, batch_size, generator)
        val_mae = float(np.mean(np.abs(_predict_examples(model, val_data) - val_data.y.numpy())))
        if val_mae < best_mae:
            best_mae, best_epoch = val_mae, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(epoch, val_mae)
    model.load_state_dict(best_state)
    targets = evaluate_predictions(
        _predict_examples(model, val_data),
        val_data.y.numpy(),
        train_data.y.numpy().mean(0),
        val_data.image_ids,
    )
    report = RewardNetReport(
        n_train=len(train),
        n_val=len(val),
        epochs=epochs,
        targets=targets,
        best_epoch=best_epoch,
        n_val_images=len(set(val_data.image_ids)),
    )
    return model.eval(), report


# --------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: RewardNet, metadata: dict[str, Any]) -> Path:
    """Write ``{"state_dict", "metadata"}`` atomically (temp file, then rename).

    ``metadata`` should hold ``input_size``, ``backend_id`` and ``manifest_hash`` (plain values
    only: ``weights_only`` loading refuses anything else); the version, targets and network
    width are added here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {
            **metadata,
            "version": CHECKPOINT_VERSION,
            "targets": list(TARGETS),
            "width": model.width,
        },
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    buffer = io.BytesIO()
    # In memory first: a full disk then fails as OSError(ENOSPC), not as torch's RuntimeError.
    torch.save(payload, buffer)
    try:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class MaskScorer(Protocol):
    """What scores a mask of an image without ground truth (a :class:`RewardScorer`, or a
    stand-in that loads one on first use)."""

    def score(self, image: np.ndarray, mask: np.ndarray) -> RewardPrediction: ...


class RewardScorer:
    """A loaded reward network: ``score(image, mask)`` -> :class:`RewardPrediction`.

    The image channel of the last few images is memoised (by content digest): an episode
    scores several masks of one image.
    """

    _MEMO_ITEMS = 8

    def __init__(self, model: RewardNet, metadata: dict[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.input_size = int(metadata["input_size"])
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()

    def _image_channel(self, image: np.ndarray) -> np.ndarray:
        key = image_digest(image)
        if key not in self._images:
            self._images[key] = image_channel(image, self.input_size)
            if len(self._images) > self._MEMO_ITEMS:
                self._images.popitem(last=False)
        self._images.move_to_end(key)
        return self._images[key]

    def score(self, image: np.ndarray, mask: np.ndarray) -> RewardPrediction:
        """Predicted (dice, recall, precision) of ``mask`` (bool or soft HxW) on ``image``."""
        x = np.stack([self._image_channel(image), mask_channel(mask, self.input_size)])
        with torch.no_grad():
            out = self.model(torch.from_numpy(x)[None])[0].tolist()
        return RewardPrediction(*out)


def _mismatch(path: Path, key: str, found: Any, expected: Any) -> UserError:
    return UserError(
        f"reward-net checkpoint {path} was made for {key}={found!r}, but this run uses "
        f"{key}={expected!r}; {HOW_TO_TRAIN}"
    )


def _short_reason(err: Exception) -> str:
    if isinstance(err, pickle.UnpicklingError):  # torch's text here is about weights_only
        return "not a valid torch zip or pickle stream"
    if isinstance(err, EOFError):
        return "the file ends too early"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first.split('. ')[0][:120]}"


def _read_payload(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, metadata)`` of a checkpoint file, or a UserError saying what is wrong."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unreadable, pickled code
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and code:
            raise UserError(
                f"reward-net checkpoint {path} holds pickled Python objects ({code.group(1)}) "
                "besides tensors and plain metadata; it is refused because loading it could run "
                f"code (torch.load with weights_only=True); {HOW_TO_TRAIN}"
            ) from None
        raise UserError(
            f"reward-net checkpoint {path} is corrupt or not a torch file "
            f"({_short_reason(err)}); {HOW_TO_TRAIN}"
        ) from None
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("state_dict"), dict)
        and isinstance(payload.get("metadata"), dict)
    ):
        raise UserError(
            f"reward-net checkpoint {path} is not a sa2va-rl reward net (expected a dict with "
            f"'state_dict' and 'metadata'); {HOW_TO_TRAIN}"
        )
    return payload["state_dict"], dict(payload["metadata"])


def load_checkpoint(
    path: str | Path,
    *,
    backend_id: str | None = None,
    manifest_hash: str | None = None,
) -> RewardScorer:
    """Load a checkpoint with ``weights_only=True``; check its version, and that it matches the
    run's backend and split when those are given. Every failure is a ``UserError`` that says
    what is wrong and how to make a matching checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"reward-net checkpoint not found: {path}; {HOW_TO_TRAIN}")
    state_dict, metadata = _read_payload(path)
    if metadata.get("version") != CHECKPOINT_VERSION:
        raise _mismatch(path, "version", metadata.get("version"), CHECKPOINT_VERSION)
    if backend_id is not None and metadata.get("backend_id") != backend_id:
        raise _mismatch(path, "backend_id", metadata.get("backend_id"), backend_id)
    if manifest_hash is not None and metadata.get("manifest_hash") != manifest_hash:
        raise _mismatch(path, "manifest_hash", metadata.get("manifest_hash"), manifest_hash)
    try:
        int(metadata["input_size"])
        # The random initialisation is overwritten at once: it must not move torch's global
        # RNG, or a trial that loads the net after RLlib seeded it would sample differently.
        with torch.random.fork_rng(devices=[]):
            model = RewardNet(int(metadata.get("width", DEFAULT_WIDTH)))
        model.load_state_dict(state_dict)
    except Exception as err:
        raise UserError(
            f"reward-net checkpoint {path} has version {CHECKPOINT_VERSION} but its weights or "
            f"metadata do not fit the network ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160]}); {HOW_TO_TRAIN}"
        ) from None
    return RewardScorer(model, metadata)
