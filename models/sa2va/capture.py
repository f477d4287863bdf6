"""Capturing Sa2VA's soft masks and SAM2's IoU around ``predict_forward``.

``predict_forward`` thresholds ``sigmoid(logits) > 0.5`` inside the model. The recorder wraps
``grounding_encoder.language_embd_inference`` (the SAM2 call that returns those logits, shape
``(frames, 1, 1024, 1024)``) to keep them, and a forward hook on
``grounding_encoder.sam2_model.sam_mask_decoder`` reads the IoU of the candidate SAM2 selected
(the largest of its predicted IoUs). :func:`soft_mask_or_reason` resizes the logits exactly as the
model does and checks them against the model's own mask before trusting them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

FLAG_NO_SEG_TOKEN = "no_seg_token"
FLAG_PROB_UNAVAILABLE = "prob_unavailable"
FLAG_MULTIPLE_SEG_TOKENS = "multiple_seg_tokens"
# Share of pixels where sigmoid(captured logits) > 0.5 may differ from the model's own mask:
# resizing in bfloat16 (model) vs float32 (here) flips only pixels whose logit is about 0. More
# than this means the captured tensor is not the one the model thresholded.
_MAX_DISAGREEMENT = 0.01


@dataclass(frozen=True)
class Capture:
    """What one ``language_embd_inference`` call produced: one [SEG] token's mask logits."""

    logits: torch.Tensor
    score: float | None


class MaskLogitRecorder:
    """Keeps the mask logits (and SAM2's predicted IoU) of every [SEG] token of one call.

    ``predict_forward`` calls ``grounding_encoder.language_embd_inference`` as a plain method,
    which a forward hook would not see, so the method is wrapped on the instance. SAM2's mask
    decoder is an ``nn.Module`` called through ``__call__``, so a forward hook reads its IoU.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.captures: list[Capture] = []
        self.unavailable_reason: str | None = None
        self._call_ious: list[float] = []
        self._undo: list[Callable[[], None]] = []
        encoder = getattr(model, "grounding_encoder", None)
        method = getattr(encoder, "language_embd_inference", None)
        if encoder is None or not callable(method):
            self.unavailable_reason = (
                f"{type(model).__name__} has no grounding_encoder.language_embd_inference "
                "(the SAM2 call whose output Sa2VA thresholds), so mask logits cannot be captured"
            )
            return
        self._wrap(encoder, method)
        decoder = getattr(getattr(encoder, "sam2_model", None), "sam_mask_decoder", None)
        if isinstance(decoder, torch.nn.Module):
            handle = decoder.register_forward_hook(self._on_decoder_output)
            self._undo.append(handle.remove)

    def _wrap(self, encoder: Any, method: Callable[..., Any]) -> None:
        def language_embd_inference(*args: Any, **kwargs: Any) -> Any:
            self._call_ious = []
            logits = method(*args, **kwargs)
            score = self._call_ious[0] if self._call_ious else None
            if isinstance(logits, torch.Tensor):
                self.captures.append(Capture(logits.detach(), score))
            return logits

        encoder.language_embd_inference = language_embd_inference
        self._undo.append(lambda: delattr(encoder, "language_embd_inference"))

    def _on_decoder_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # SAM2 MaskDecoder returns (masks, iou_pred (B, M), sam_tokens, object_score_logits);
        # with several candidate masks SAM2 keeps the one with the highest predicted IoU.
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            self._call_ious.append(float(output[1].detach().float().max()))

    def reset(self) -> None:
        self.captures = []
        self._call_ious = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def soft_mask_or_reason(
    unavailable_reason: str | None,
    captures: list[Capture],
    hard_masks: list[np.ndarray],
    size: tuple[int, int],
) -> np.ndarray | str:
    """The soft mask at ``size`` from the captured logits, or why there is none."""
    if unavailable_reason is not None:
        return unavailable_reason
    if len(captures) != len(hard_masks):
        return (
            f"captured {len(captures)} logit maps for {len(hard_masks)} masks; the model no "
            "longer calls language_embd_inference once per [SEG] token"
        )
    probs = []
    for capture, hard in zip(captures, hard_masks, strict=True):
        if capture.logits.ndim != 4:
            return (
                f"captured logits have shape {tuple(capture.logits.shape)}, "
                "expected (frames, 1, H, W)"
            )
        at_model_size = _sigmoid_resized(capture.logits, hard.shape)
        disagreement = np.count_nonzero((at_model_size > 0.5) != hard) / hard.size
        if disagreement > _MAX_DISAGREEMENT:
            return (
                f"sigmoid(captured logits) > 0.5 differs from the model's mask on "
                f"{disagreement:.1%} of pixels; the model post-processes the logits after "
                "language_embd_inference"
            )
        if hard.shape == size:
            probs.append(_agree_with(at_model_size, hard))
        else:
            probs.append(_sigmoid_resized(capture.logits, size))
    return np.maximum.reduce(probs)


def hard_mask(mask: Any, model_size: tuple[int, ...]) -> np.ndarray:
    """One ``prediction_masks`` entry as a bool (H, W) array; checks it has the model's size."""
    # predict_forward returns one (frames, H, W) bool array per [SEG]; an image has one frame.
    array = np.asarray(mask)
    array = array[0] if array.ndim == 3 else array
    if array.shape != tuple(model_size[:2]):
        raise RuntimeError(f"Sa2VA returned a mask of shape {array.shape} for {model_size[:2]}")
    return array.astype(bool)


def _sigmoid_resized(logits: torch.Tensor, size: tuple[int, ...]) -> np.ndarray:
    # Same resize as Sa2VA's predict_forward: bilinear, align_corners=False, first frame/object.
    resized = F.interpolate(
        logits[:1, :1].float(), size=(int(size[0]), int(size[1])), mode="bilinear",
        align_corners=False,
    )  # fmt: skip
    return torch.sigmoid(resized[0, 0]).cpu().numpy().astype(np.float32)


def _agree_with(prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Nudge the few pixels where float32 and the model's own precision disagree about the 0.5
    # threshold, so that `prob > 0.5` is exactly the model's mask.
    prob = prob.copy()
    prob[mask & (prob <= 0.5)] = np.nextafter(np.float32(0.5), np.float32(1.0))
    prob[~mask & (prob > 0.5)] = np.float32(0.5)
    return prob


def upscale_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` (no soft mask to resize)."""
    if mask.shape == size:
        return mask
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]
