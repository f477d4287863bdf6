"""Test-only segmentation backends: deterministic, with latency, event logging and OOM injection.

``FakeSegmenter`` satisfies the Segmenter protocol. Its answer is a pure function of (image bytes,
prompt, effective input size), so a test can recompute the expected result in-process and compare
it bit for bit with what came through Ray workers and caches.

Events (backend loads and forward passes) are appended as JSON lines to ``events_path``; a file
survives worker restarts and is readable from the test process, which a counter in the worker's
memory would not be. ``O_APPEND`` writes of one short line are atomic on a local filesystem, so
several worker processes may share one file.

Ray workers cannot import this module (it is not part of the installed package): tests and the
benchmark call ``ray.cloudpickle.register_pickle_by_value(fakes)`` so the classes travel by value.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.segmentation import Segmentation


def _log_event(path: str | None, **event: Any) -> None:
    if path is None:
        return
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """The events logged so far (optionally only those of ``kind``: ``"load"`` or ``"forward"``)."""
    if not Path(path).exists():
        return []
    events = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [e for e in events if kind is None or e["event"] == kind]


class FakeSegmenter:
    """A deterministic Segmenter with a configurable per-call latency and injected CUDA OOM.

    Args:
        backend_id: ``backend_id`` is this plus ``:cap-<input_cap>``.
        latency_s: sleep per forward pass (simulates the model's cost).
        events_path: JSON-lines file receiving one ``forward`` event per successful call.
        oom_above: raise ``torch.OutOfMemoryError`` when the effective input side (the image's
            longest side, limited by ``input_cap``) is above this many pixels.
        input_cap: longest side the model works at; larger images are subsampled, so the answer
            changes with the cap (like a real backend that resizes).
        cuda_fault_prompt: raise a CUDA error other than OOM (``torch.AcceleratorError``, an
            illegal memory access) for this prompt.
    """

    def __init__(
        self,
        backend_id: str = "fake-v1",
        latency_s: float = 0.0,
        events_path: str | None = None,
        oom_above: int | None = None,
        input_cap: int | None = None,
        cuda_fault_prompt: str | None = None,
    ) -> None:
        self._backend_id = backend_id
        self.cuda_fault_prompt = cuda_fault_prompt
        self.latency_s = latency_s
        self.events_path = events_path
        self.oom_above = oom_above
        self.input_cap = input_cap

    @property
    def backend_id(self) -> str:
        # Like Sa2VA's, the id includes the input cap: the answer depends on it.
        return f"{self._backend_id}:cap-{self.input_cap if self.input_cap is not None else 'none'}"

    def set_input_cap(self, cap: int) -> None:
        self.input_cap = int(cap)

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        side = max(image.shape[:2])
        effective = side if self.input_cap is None else min(side, self.input_cap)
        if prompt == self.cuda_fault_prompt:
            import torch

            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        if self.oom_above is not None and effective > self.oom_above:
            import torch  # only the OOM path needs it; keeps worker start-up fast

            raise torch.OutOfMemoryError(f"fake CUDA OOM at input side {effective}")
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        seg = fake_answer(image, prompt, effective)
        _log_event(
            self.events_path,
            event="forward",
            pid=os.getpid(),
            prompt=prompt,
            image=zlib.crc32(image.tobytes()),
            side=effective,
        )
        return seg


def fake_answer(image: np.ndarray, prompt: str, effective_side: int | None = None) -> Segmentation:
    """What :class:`FakeSegmenter` answers (``effective_side`` defaults to the full size)."""
    gray = image.astype(np.float32).mean(axis=2) / 255.0
    side = max(image.shape[:2])
    if effective_side is not None and effective_side < side:
        step = -(-side // effective_side)
        small = gray[::step, ::step]
        gray = np.repeat(np.repeat(small, step, axis=0), step, axis=1)[
            : image.shape[0], : image.shape[1]
        ]
    # A prompt-dependent offset: different prompts give different masks on the same image.
    offset = (zlib.crc32(prompt.encode()) % 1000) / 1000.0 - 0.5
    prob = np.clip(gray + np.float32(offset), 0.0, 1.0).astype(np.float32)
    mask = prob > 0.5
    score = float(zlib.crc32(prompt.encode()) % 997) / 997.0
    return Segmentation(mask=mask, prob=prob, score=score, flags=("fake",))


@dataclass(frozen=True)
class FakeBackendFactory:
    """A picklable zero-argument factory (what a worker calls once per incarnation).

    Logs a ``load`` event each time it builds a backend, so tests can count model loads.
    """

    backend_id: str = "fake-v1"
    latency_s: float = 0.0
    events_path: str | None = None
    oom_above: int | None = None
    cuda_fault_prompt: str | None = None

    def __call__(self) -> FakeSegmenter:
        _log_event(self.events_path, event="load", pid=os.getpid())
        return FakeSegmenter(
            self.backend_id,
            self.latency_s,
            self.events_path,
            self.oom_above,
            cuda_fault_prompt=self.cuda_fault_prompt,
        )


def random_image(seed: int, size: int = 64) -> np.ndarray:
    """A reproducible uint8 RGB test image."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


class RequestReplayer:
    """Replays (image seed, prompt) requests through a segmenter; wrapped in ``ray.remote`` by
    tests so that each caller holds its own (unpickled) client in its own actor process."""

    def __init__(self, segmenter: Any, image_size: int = 64) -> None:
        self.segmenter = segmenter
        self.image_size = image_size

    def run(self, requests: list[tuple[int, str]]) -> list[Segmentation]:
        return [
            self.segmenter.segment(random_image(seed, self.image_size), prompt)
            for seed, prompt in requests
        ]
