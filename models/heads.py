"""Frozen features and a trainable mask head: the contract reward-guided fine-tuning runs on.

A backend that can be fine-tuned splits its forward pass in two:

- :meth:`HeadBackend.frozen_inputs`: everything that does not change while the head trains (for
  Sa2VA: SAM2's image features and the ``[SEG]`` hidden state of each prompt; for Frangi: the image
  and the preset's vesselness responses), computed once per (image, prompt) with no gradient, as
  detached CPU tensors a cache or a Ray object can hold;
- a :class:`MaskHead` (a ``torch.nn.Module``) that maps one :class:`FrozenInputs` to mask
  **logits** at the image's size, differentiable in the head's parameters (for Sa2VA:
  ``text_hidden_fcs`` + SAM2's ``sam_mask_decoder``, as upstream fine-tunes them; for Frangi: a
  small CNN).

At initialisation ``sigmoid(head(inputs))`` is the backend's own soft mask for that (image,
prompt), so fine-tuning starts exactly at the baseline. :meth:`HeadBackend.export` writes a model
that the backend (and, for Sa2VA, upstream ``AutoModel.from_pretrained``) loads like any other
checkpoint, with its own backend id.

Nothing here imports Ray; the orchestrator decides where features are computed and where the
head trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from models.segmentation import Segmentation


@dataclass(frozen=True)
class FrozenInputs:
    """What a head needs for one (image, prompt), computed once with no gradient.

    Attributes:
        prompt: the prompt the inputs were computed for.
        size: the image's (height, width); the head's logits have this shape.
        tensors: named, detached CPU tensors (the backend documents the names).
        meta: small plain-data facts (e.g. ``{"seg_tokens": 1}``); JSON-serialisable.
    """

    prompt: str
    size: tuple[int, int]
    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class MaskHead(Protocol):
    """A trainable head: ``head(inputs)`` -> float32 logits of shape ``inputs.size``.

    A head also knows its backend's rule from soft mask to segmentation (``segmentation``) and
    how to write itself as a model (``export``), so a process holding only the head (a trial)
    can evaluate and export it."""

    def __call__(self, inputs: FrozenInputs) -> torch.Tensor: ...

    def segmentation(self, prob: np.ndarray, inputs: FrozenInputs) -> Segmentation:
        """The backend's segmentation of the head's soft mask ``prob`` (float32 HxW)."""
        ...

    def export(self, folder: Path, provenance: Mapping[str, Any], base_backend_id: str) -> Path:
        """Write a model with this head's weights to ``folder`` (with ``provenance.json``),
        one that ``--model-path`` / ``backend.model_path`` accepts; returns the folder."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class HeadBackend(Protocol):
    """A segmentation backend that can be fine-tuned through a head."""

    @property
    def backend_id(self) -> str: ...

    def frozen_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[FrozenInputs]:
        """The frozen inputs of ``image`` (uint8 HxWx3 RGB) for each prompt, in order; image-only
        work is done once for all prompts."""
        ...

    def initial_head(self) -> MaskHead:
        """A fresh head whose soft mask equals the backend's own (fine-tuning's start)."""
        ...

    def export(self, head: MaskHead, folder: Path, provenance: Mapping[str, Any]) -> Path:
        """Write a model with ``head``'s weights to ``folder`` (with ``provenance.json``) that
        ``--model-path`` / ``backend.model_path`` accepts; returns the folder."""
        ...


class HeadSegmenter:
    """A :class:`~models.segmentation.Segmenter` that applies ``head`` to the frozen inputs
    ``backend`` computes: the masks of the model ``head.export`` writes, without loading it.

    ``backend_id`` is ``<base backend id>+head:<12 hex of the head's weights>``, so results of
    different heads never share a cache entry or a report row.
    """

    def __init__(self, head: MaskHead, backend: HeadBackend) -> None:
        self.head = head
        self.backend = backend
        self._backend_id = f"{backend.backend_id}+head:{state_digest(head)}"

    @property
    def backend_id(self) -> str:
        return self._backend_id

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        """Every prompt's segmentation of ``image`` (one ``frozen_inputs`` call)."""
        found = []
        with torch.no_grad():
            for inputs in self.backend.frozen_inputs(image, prompts):
                prob = torch.sigmoid(self.head(inputs)).cpu().numpy().astype(np.float32)
                found.append(self.head.segmentation(prob, inputs))
        return found


def state_digest(head: MaskHead) -> str:
    """12 hex of the sha256 over the head's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(head.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def reuse_equal(
    tensors: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tensors`` with each one equal to ``previous``'s tensor of the same name replaced by
    that object: inputs that do not depend on the image (e.g. SAM2's positional encoding) are
    then held once for all images, not once per image."""
    shared = dict(tensors)
    for name, tensor in shared.items():
        before = previous.get(name)
        if before is not None and before is not tensor and torch.equal(before, tensor):
            shared[name] = before
    return shared
