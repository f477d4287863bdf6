"""Opt-in check against a real Sa2VA checkpoint (weights and a CUDA GPU needed)::

    SA2VA_RL_MODEL=/models/Sa2VA-4B pytest -m sa2va_real

Skipped unless ``SA2VA_RL_MODEL`` names a model folder; ``SA2VA_RL_DEVICE`` (default ``auto``)
picks the GPU. It loads the folder exactly as a run would (preflight, then the segmenter) and
checks on synthetic angiograms what the tiny fixtures stand in for: the captured soft mask
thresholds to the model's own mask pixel for pixel, and ``score`` is the IoU SAM2 selected.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from PIL import Image

from envs.synthetic import generate_samples
from models.prompts import DEFAULT_PROMPT
from models.sa2va import FLAG_PROB_UNAVAILABLE, Sa2VASegmenter, format_prompt, preflight

MODEL = os.environ.get("SA2VA_RL_MODEL")
DEVICE = os.environ.get("SA2VA_RL_DEVICE", "auto")

pytestmark = [
    pytest.mark.sa2va_real,
    pytest.mark.skipif(not MODEL, reason="set SA2VA_RL_MODEL=/path/to/a Sa2VA model folder"),
]


@pytest.fixture(scope="module")
def real() -> Sa2VASegmenter:
    assert MODEL is not None
    preflight(MODEL, device=DEVICE)
    return Sa2VASegmenter(MODEL, device=DEVICE)


def test_soft_mask_is_the_model_mask_and_score_the_selected_iou(real: Sa2VASegmenter) -> None:
    decoder = real.model.grounding_encoder.sam2_model.sam_mask_decoder
    seen: list[Any] = []
    handle = decoder.register_forward_hook(lambda m, a, out: seen.append(out[1].detach()))
    try:
        for sample in generate_samples(3, seed=0):
            seen.clear()
            result = real.segment(sample.image, DEFAULT_PROMPT)
            assert result.mask.shape == sample.image.shape[:2]
            if not result.mask.any() and result.score is None:
                continue  # an answer without [SEG]: nothing to compare
            assert FLAG_PROB_UNAVAILABLE not in result.flags
            assert result.prob is not None
            np.testing.assert_array_equal(result.prob > 0.5, result.mask)
            assert result.score == pytest.approx(float(seen[0].float().max()), abs=0)
            own = _model_masks(real, sample.image)
            np.testing.assert_array_equal(result.mask, np.logical_or.reduce(own))
    finally:
        handle.remove()


def _model_masks(seg: Sa2VASegmenter, image: np.ndarray) -> list[np.ndarray]:
    kwargs: dict[str, Any] = {
        "image": Image.fromarray(image),
        "text": format_prompt(DEFAULT_PROMPT),
        "tokenizer": seg._tokenizer,
    }
    if seg._processor is not None:
        kwargs["processor"] = seg._processor
    import torch

    with torch.no_grad():
        output = seg.model.predict_forward(**kwargs)
    return [np.asarray(m)[0].astype(bool) for m in output["prediction_masks"]]
