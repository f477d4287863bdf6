"""The fine-tuning view of a run's worker pool: :class:`WorkerHeadBackend`.

A trial fine-tunes a mask head (:mod:`models.heads`) in its own process, but the model that
computes the head's frozen inputs lives in the segmentation workers (a Sa2VA worker holds the
checkpoint on its GPU; a trial never loads a second copy). This adapter gives the trial a
:class:`~models.heads.HeadBackend` whose calls go to the workers through a
:class:`~orchestrator.inference.client.SegmentationClient`:

- ``frozen_inputs(image, prompts)``: from the worker that serves ``image`` (routed by its
  digest, as segmentation requests are; Frangi's soft masks come from that worker's cache);
- ``initial_head()``: a fresh head from the first worker, sent as a pickled module (a Sa2VA head
  re-imports the checkpoint's remote code where it is unpickled, so the model folder must be
  readable where the trial runs, as it must be for the export);
- ``export(head, ...)``: the head's own export, written from the trial's process.

Image-independent tensors (equal from one image to the next: SAM2's positional encoding, its
no-mask embedding) arrive once per image over Ray; they are replaced by the first image's
objects, so the trial holds them once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.heads import FrozenInputs, MaskHead, reuse_equal

if TYPE_CHECKING:
    import torch

    from orchestrator.inference.client import SegmentationClient


class WorkerHeadBackend:
    """:class:`~models.heads.HeadBackend` over a worker pool (see the module docstring)."""

    def __init__(self, client: SegmentationClient) -> None:
        self.client = client
        self._previous: dict[str, torch.Tensor] = {}

    @property
    def backend_id(self) -> str:
        return self.client.backend_id

    def frozen_inputs(self, image: np.ndarray, prompts: Sequence[str]) -> list[FrozenInputs]:
        found: list[FrozenInputs] = self.client.head_inputs(image, prompts)
        shared = []
        for inputs in found:
            tensors = reuse_equal(inputs.tensors, self._previous)
            self._previous = {**self._previous, **tensors}
            shared.append(FrozenInputs(inputs.prompt, inputs.size, tensors, inputs.meta))
        return shared

    def initial_head(self) -> MaskHead:
        head: MaskHead = self.client.initial_head()
        return head

    def export(self, head: Any, folder: Path, provenance: Mapping[str, Any]) -> Path:
        """``head.export`` with this pool's backend id as the base."""
        return Path(head.export(Path(folder), provenance, self.backend_id))
