"""Per-image work stays together: a worker hands the prompts of one image it has to compute to
its backend in one ``segment_prompts`` call, the client routes every prompt of an image to one
worker, and the warm-up sends whole images. In-process workers (no Ray), the same transports and
routing as over Ray actors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fakes import FakeSegmenter, random_image

from models.segmentation import Segmentation, image_digest
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.warmup import warm_up_pool
from orchestrator.inference.worker import SegmentationWorker

PROMPTS = ["p0", "p1", "p2", "p3"]
Call = tuple[str, str, tuple[str, ...]]  # (worker, image digest, prompts of one backend call)


class Recording(FakeSegmenter):
    """The fake with a ``segment_prompts`` that logs each call (worker, digest, prompts)."""

    def __init__(self, worker: str, log: list[Call]) -> None:
        super().__init__()
        self.worker, self.log = worker, log

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        return self.segment_prompts(image, [prompt])[0]

    def segment_prompts(self, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        self.log.append((self.worker, image_digest(image), tuple(prompts)))
        return [super(Recording, self).segment(image, p) for p in prompts]


def pool(n: int, cache: Path | None, log: list[Call]) -> tuple[SegmentationClient, list]:
    folder = str(cache) if cache else None
    workers = [
        SegmentationWorker(f"w{i}", lambda i=i: Recording(f"w{i}", log), folder) for i in range(n)
    ]
    return SegmentationClient.in_process(workers, memo_entries=0), workers


def test_worker_sends_the_missing_prompts_of_an_image_in_one_backend_call() -> None:
    log: list[Call] = []
    client, workers = pool(1, None, log)
    image = random_image(0)
    client.segment(image, "p1")
    answers = client.segment_prompts(image, PROMPTS)
    assert [prompts for _, _, prompts in log] == [("p1",), ("p0", "p2", "p3")]
    assert workers[0].stats()["forward_passes"] == 4
    for prompt, seg in zip(PROMPTS, answers, strict=True):
        assert seg.mask.tobytes() == FakeSegmenter().segment(image, prompt).mask.tobytes()


def test_client_routes_every_prompt_of_an_image_to_one_worker() -> None:
    log: list[Call] = []
    client, _ = pool(3, None, log)
    images = [random_image(seed) for seed in range(12)]
    for image in images:
        for prompt in PROMPTS:
            client.segment(image, prompt)  # prompt by prompt, as an environment step asks
    served = {(digest, worker) for worker, digest, _ in log}
    routed = {(image_digest(im), f"w{client.route(image_digest(im))}") for im in images}
    assert served == routed and len({worker for _, worker in routed}) == 3


def test_warm_up_sends_whole_images_to_one_worker_each(tmp_path: Path) -> None:
    log: list[Call] = []
    client, _ = pool(3, tmp_path, log)
    images = [random_image(seed) for seed in range(20)]
    report = warm_up_pool(client, images, PROMPTS, window=2)
    assert report.computed == 20 * len(PROMPTS)
    # One backend call per image, with every prompt, on one worker.
    assert sorted(digest for _, digest, _ in log) == sorted(image_digest(im) for im in images)
    assert all(prompts == tuple(PROMPTS) for _, _, prompts in log)
    # Later requests for the image, prompt by prompt, are all answered without the model.
    for image in images:
        for prompt in PROMPTS:
            client.segment(image, prompt)
    assert len(log) == 20
