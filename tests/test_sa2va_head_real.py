"""Opt-in check of the Sa2VA head and its export against a real checkpoint (weights and a CUDA
GPU needed)::

    SA2VA_RL_MODEL=/models/Sa2VA-1B pytest -m sa2va_real tests/test_sa2va_head_real.py

Skipped unless ``SA2VA_RL_MODEL`` names a model folder. What the tiny fixtures pin bit for bit
(float32 on the CPU) holds here up to the model's bfloat16: the head at initialisation agrees
with the model's own mask on at least 99% of the pixels (checked inside ``frozen_inputs``), and
after a gradient step the exported folder's masks agree with ``sigmoid(head) > 0.5`` as well.
The export writes a full copy of the checkpoint under pytest's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_sa2va_real import DEVICE, MODEL

from envs.synthetic import generate_samples
from models.prompts import DEFAULT_PROMPT
from models.sa2va import Sa2VASegmenter
from models.sa2va.head import MAX_MASK_DISAGREEMENT, Sa2VAHeadBackend

pytestmark = [
    pytest.mark.sa2va_real,
    pytest.mark.skipif(not MODEL, reason="set SA2VA_RL_MODEL=/path/to/a Sa2VA model folder"),
]


def test_head_reproduces_trains_and_exports(tmp_path: Path) -> None:
    assert MODEL is not None
    backend = Sa2VAHeadBackend(Sa2VASegmenter(MODEL, device=DEVICE))
    images = [s.image for s in generate_samples(2, seed=0)]
    inputs = [x for image in images for x in backend.frozen_inputs(image, [DEFAULT_PROMPT])]
    assert all(x.meta["mask_disagreement"] <= MAX_MASK_DISAGREEMENT for x in inputs)
    trainable = [x for x in inputs if x.meta["seg_tokens"] > 0]
    assert trainable, "the model answered no prompt with [SEG]"

    head = backend.initial_head().to(backend.segmenter.device).train()
    optimiser = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=1e-4)
    loss = -torch.stack([torch.sigmoid(head(x)).mean() for x in trainable]).sum()
    loss.backward()
    optimiser.step()
    head.eval()

    out = backend.export(head.cpu(), tmp_path / "Sa2VA-tuned", {"steps": 1})
    tuned = Sa2VASegmenter(out, device=DEVICE)
    assert tuned.backend_id != backend.backend_id
    for x, image in zip(inputs, images, strict=True):
        with torch.no_grad():
            expected = (torch.sigmoid(head(x)) > 0.5).numpy()
        mask = tuned.segment(image, x.prompt).mask
        assert np.count_nonzero(mask != expected) / mask.size <= MAX_MASK_DISAGREEMENT
