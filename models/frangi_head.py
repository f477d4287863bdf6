"""The Frangi backend with a trainable head: :class:`~models.heads.HeadBackend` for the default
backend, and the segmenter an exported head folder loads as.

Frozen inputs of one (image, prompt) (:meth:`FrangiHeadBackend.frozen_inputs`), computed with
the base segmenter (the run's cache-backed workers, or a :class:`~models.frangi.FrangiSegmenter`):

- ``"grey"``: uint8 HxW, the image in grey levels;
- ``"prob"``: float32 HxW, the preset's normalised vesselness, i.e. the backend's own soft mask
  ``v**2 / (v**2 + t**2)`` (its logit is ``2 log(v / t)``: the vesselness response relative to
  the preset's threshold);
- ``"suppressed"``: bool HxW, the pixels the preset zeroed as catheter (``prob == 0`` for
  presets that remove a catheter; all False otherwise);
- meta ``min_component_px``: the preset's small-component rule.

The head (:class:`FrangiHead`) returns ``logit(clip(prob, EPS, 1 - EPS)) + residual + shift``:
``residual`` is a small dilated CNN over (grey, prob, tanh(logit / 4)) at a quarter of the
resolution, upsampled, and ``shift`` a per-image bias from the CNN's pooled features (the
per-image threshold direction the post-processing oracle exploits). Their output layers start
at zero, so at initialisation ``sigmoid(head(inputs))`` equals ``prob`` to within ``EPS``
(absolute; float32 rounding elsewhere, about 1e-7) and fine-tuning starts at the baseline.

The head's hard mask (:func:`head_segmentation`) follows the preset's rule: ``prob > 0.5``,
components smaller than ``min_component_px`` dropped, ``suppressed`` pixels removed. At
initialisation it equals the backend's mask for presets without catheter removal; with it, a
fragment that the catheter cut below ``min_component_px`` is dropped here and kept there.

An exported head is a folder (:meth:`FrangiHeadBackend.export`): ``head.pt`` (a state dict,
loaded with ``weights_only=True``), ``frangi_head.json`` (format, architecture, the base
backend id) and ``provenance.json``. ``backend.model_path`` (``--model-path``) with the Frangi
backend accepts it (:func:`load_head_segmenter`); its backend id ``frangi-head:<hash>`` hashes
the weights and the architecture, so its cache entries are its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.errors import UserError
from models.frangi import PRESETS, FrangiSegmenter, drop_small_components, preset_name_for
from models.heads import FrozenInputs, HeadSegmenter
from models.segmentation import Segmentation, Segmenter, segment_all

EPS = 1e-6
"""``prob`` is clipped to ``[EPS, 1 - EPS]`` before its logit: the head's initial soft mask
differs from the backend's by at most this much (where the backend says exactly 0)."""
HEAD_FORMAT = 1
"""Bump when the head's architecture or inputs change: older folders are then refused."""
WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE = "head.pt", "frangi_head.json", "provenance.json"
DEFAULT_WIDTH = 8
DEFAULT_SCALE = 4


class FrangiHead(nn.Module):
    """``logit(prob) + residual + shift`` (see the module docstring); ``width`` channels,
    the residual computed at ``1/scale`` of the image's resolution."""

    def __init__(self, width: int = DEFAULT_WIDTH, scale: int = DEFAULT_SCALE) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
            nn.ReLU(),
        )
        self.residual = nn.Conv2d(width, 1, 3, padding=1)
        self.shift = nn.Linear(width, 1)
        for parameter in (*self.residual.parameters(), *self.shift.parameters()):
            nn.init.zeros_(parameter)

    def forward(self, inputs: FrozenInputs) -> torch.Tensor:
        """Logits (float32, ``inputs.size``) of one (image, prompt), on the head's device."""
        return self.batch_logits([inputs])[0]

    def batch_logits(self, batch: Sequence[FrozenInputs]) -> torch.Tensor:
        """Logits (N, H, W) of equally sized frozen inputs, on the head's device."""
        device = self.residual.weight.device
        grey, prob = stack_inputs(batch)
        return self.logits(grey.to(device), prob.to(device))

    def logits(self, grey: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Logits (N, H, W) of a batch: ``grey`` uint8 (N, H, W), ``prob`` float32 (N, H, W)."""
        base = torch.logit(prob.clamp(EPS, 1 - EPS))
        x = torch.stack([grey.float() / 255.0, prob, torch.tanh(base / 4)], dim=1)
        hidden = self.body(F.avg_pool2d(x, self.scale) if self.scale > 1 else x)
        residual = F.interpolate(
            self.residual(hidden), size=prob.shape[-2:], mode="bilinear", align_corners=False
        )
        shift = self.shift(hidden.mean(dim=(2, 3)))
        return base + residual[:, 0] + shift[:, :, None]

    def segmentation(self, prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
        """:func:`head_segmentation`."""
        return head_segmentation(prob, inputs)

    def export(self, folder: Path, provenance: Mapping[str, Any], base_backend_id: str) -> Path:
        """Write ``head.pt``, ``frangi_head.json`` and ``provenance.json`` into ``folder``
        (replaced whole: written beside it, then renamed); ``base_backend_id`` is the Frangi
        backend the head was trained on (:func:`load_head_segmenter` checks it)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save(state, staging / WEIGHTS_FILE)
        config = {
            "format": HEAD_FORMAT,
            "width": self.width,
            "scale": self.scale,
            "base_backend_id": base_backend_id,
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        document = {**provenance, "base_backend_id": base_backend_id}
        (staging / PROVENANCE_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(folder)
        return folder


def stack_inputs(batch: Sequence[FrozenInputs]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grey, prob)`` of equally sized frozen inputs, stacked along a new first axis."""
    grey = torch.stack([inputs.tensors["grey"] for inputs in batch])
    prob = torch.stack([inputs.tensors["prob"] for inputs in batch])
    return grey, prob


def head_segmentation(prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
    """The hard mask the preset's rule makes of the head's soft mask ``prob`` (float32 HxW):
    ``prob > 0.5``, small components dropped, ``suppressed`` pixels removed (prob 0 there)."""
    suppressed = inputs.tensors["suppressed"].numpy()
    prob = np.where(suppressed, np.float32(0), prob).astype(np.float32)
    mask = drop_small_components(prob > 0.5, int(inputs.meta["min_component_px"]))
    return Segmentation(mask=mask & ~suppressed, prob=prob)


class FrangiHeadBackend:
    """:class:`~models.heads.HeadBackend` of the Frangi backend over a base segmenter whose
    soft masks are Frangi's (the run's workers, or a :class:`FrangiSegmenter`)."""

    def __init__(self, base: Segmenter | None = None) -> None:
        self.base: Segmenter = base if base is not None else FrangiSegmenter()
        if not self.base.backend_id.startswith("frangi:"):
            raise ValueError(f"a Frangi head needs Frangi's soft masks, got {self.base.backend_id}")

    @property
    def backend_id(self) -> str:
        return self.base.backend_id

    def segmentation(self, prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
        """The head's segmentation from its soft mask (:func:`head_segmentation`)."""
        return head_segmentation(prob, inputs)

    def frozen_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[FrozenInputs]:
        """See the module docstring; one base request per prompt (image work shared by the
        base segmenter)."""
        grey = torch.from_numpy(_grey(image))
        found = []
        for prompt, seg in zip(prompts, segment_all(self.base, image, prompts), strict=True):
            assert seg.prob is not None, "the Frangi backend gives soft masks"
            preset = PRESETS[preset_name_for(prompt)]
            suppressed = (seg.prob == 0) if preset.suppress_catheter else np.zeros_like(seg.mask)
            found.append(
                FrozenInputs(
                    prompt=prompt,
                    size=seg.mask.shape,
                    tensors={
                        "grey": grey,
                        "prob": torch.from_numpy(seg.prob.copy()),
                        "suppressed": torch.from_numpy(suppressed),
                    },
                    meta={"min_component_px": preset.min_component_px},
                )
            )
        return found

    def initial_head(self) -> FrangiHead:
        return FrangiHead()

    def export(self, head: Any, folder: Path, provenance: Mapping[str, Any]) -> Path:
        """``head.export`` over this backend (:meth:`FrangiHead.export`)."""
        if not isinstance(head, FrangiHead):
            raise TypeError(f"expected a FrangiHead, got {type(head).__name__}")
        return head.export(folder, provenance, self.backend_id)


class FrangiHeadSegmenter(HeadSegmenter):
    """A :class:`~models.segmentation.Segmenter`: the base Frangi segmenter, then ``head``
    (:class:`~models.heads.HeadSegmenter` over a :class:`FrangiHeadBackend`).

    ``backend_id`` is ``frangi-head:<sha256 of the head's config and weights, 12 hex>``, the id
    an exported head folder keeps wherever it is loaded.
    """

    def __init__(self, head: FrangiHead, base: Segmenter | None = None) -> None:
        backend = FrangiHeadBackend(base)
        super().__init__(head.eval(), backend)
        self._backend_id = "frangi-head:" + head_digest(head, backend.backend_id)

    @property
    def backend_id_base(self) -> str:
        return self.backend.backend_id


def head_digest(head: FrangiHead, base_backend_id: str) -> str:
    """12 hex of the sha256 over the architecture, the base backend id and the weights."""
    digest = hashlib.sha256(
        json.dumps([HEAD_FORMAT, head.width, head.scale, base_backend_id]).encode()
    )
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def is_head_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder an exported Frangi head was written to."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


def load_head(folder: str | Path) -> tuple[FrangiHead, dict[str, Any]]:
    """The head of an exported folder and its ``frangi_head.json``; a ``UserError`` says what
    is missing or does not fit."""
    folder = Path(folder).expanduser()
    if not is_head_folder(folder):
        raise UserError(
            f"{folder} is not an exported Frangi head (no {CONFIG_FILE}); give the folder a "
            "reward_finetune or supervised_finetune trial wrote (RUN/finetune/<trial>/model)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != HEAD_FORMAT:
        raise UserError(
            f"{folder / CONFIG_FILE}: head format {config.get('format')!r}, this version reads "
            f"{HEAD_FORMAT}; fine-tune the head again with this version"
        )
    head = FrangiHead(int(config["width"]), int(config["scale"]))
    try:
        head.load_state_dict(
            torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        )
    except Exception as err:
        raise UserError(
            f"{folder / WEIGHTS_FILE}: not the weights of this head "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from None
    return head.eval(), config


def load_head_segmenter(folder: str | Path, base: Segmenter | None = None) -> FrangiHeadSegmenter:
    """The segmenter of an exported head folder over ``base`` (default: a fresh
    :class:`FrangiSegmenter`); refused when the head was trained on other Frangi presets."""
    head, config = load_head(folder)
    segmenter = FrangiHeadSegmenter(head, base)
    if config["base_backend_id"] != segmenter.backend_id_base:
        raise UserError(
            f"{folder}: this head was fine-tuned on backend {config['base_backend_id']}, but "
            f"the Frangi backend here is {segmenter.backend_id_base} (its presets changed); "
            "fine-tune the head again"
        )
    return segmenter


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
