"""The client's protocol without Ray: memo, routing, one call per cold miss, one hash, retry.

The client talks to in-process workers through transports; a flaky transport stands in for a
restarting Ray actor.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from fakes import FakeBackendFactory, fake_answer, random_image

import orchestrator.inference.client as client_module
from models.segmentation import Segmentation, image_digest
from orchestrator.inference.client import (
    SegmentationClient,
    SegmentationRequestError,
    SegmentationWorkerUnavailableError,
)
from orchestrator.inference.transport import (
    InProcessTransport,
    WorkerCrashed,
    WorkerTimedOut,
    WorkerUnavailable,
)
from orchestrator.inference.worker import SegmentationWorker


class CountingTransport(InProcessTransport):
    """An in-process transport that counts calls and can fail its first ``failures`` serves
    (by default as a restarting worker; ``error``: another transport error)."""

    def __init__(
        self, worker: SegmentationWorker, failures: int = 0, error: Exception | None = None
    ) -> None:
        super().__init__(worker)
        self.serves: list[list[str]] = []
        self.failures = failures
        self.error = error or WorkerUnavailable("ActorUnavailableError: restarting")
        self.attempts = 0
        self.resets = 0

    def serve(self, digest: str, image: np.ndarray, prompts: Sequence[str]) -> list[Segmentation]:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise self.error
        self.serves.append(list(prompts))
        return super().serve(digest, image, prompts)

    def reset(self) -> None:
        self.resets += 1


def _transports(n: int, failures: int = 0) -> list[CountingTransport]:
    return [
        CountingTransport(SegmentationWorker(f"w{i}", FakeBackendFactory()), failures)
        for i in range(n)
    ]


def test_a_cold_miss_is_one_call_and_one_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    hashes: list[int] = []

    def counting_digest(image: np.ndarray) -> str:
        hashes.append(1)
        return image_digest(image)

    monkeypatch.setattr(client_module, "image_digest", counting_digest)
    monkeypatch.setattr("orchestrator.inference.worker.image_digest", counting_digest)
    (transport,) = _transports(1)
    client = SegmentationClient([transport])
    image = random_image(0)
    segs = client.segment_prompts(image, ["p0", "p1", "p2"])
    assert transport.serves == [["p0", "p1", "p2"]]
    assert len(hashes) == 1
    assert client.stats()["total"]["forward_passes"] == 3
    for prompt, seg in zip(["p0", "p1", "p2"], segs, strict=True):
        assert np.array_equal(seg.mask, fake_answer(image, prompt).mask)


def test_memo_answers_repeats_without_a_call_and_asks_only_what_is_missing() -> None:
    (transport,) = _transports(1)
    client = SegmentationClient([transport], memo_entries=8)
    image = random_image(1)
    first = client.segment(image, "p0")
    assert client.segment(image, "p0") is first
    client.segment_prompts(image, ["p0", "p1"])
    assert transport.serves == [["p0"], ["p1"]]
    assert client.stats()["client"]["memo_hits"] == 2


def test_a_second_client_gets_cached_answers_without_a_forward_pass() -> None:
    (transport,) = _transports(1)
    image = random_image(2)
    SegmentationClient([transport]).segment_prompts(image, ["p0", "p1"])
    SegmentationClient([transport], memo_entries=0).segment_prompts(image, ["p0", "p1"])
    total = SegmentationClient([transport]).stats()["total"]
    assert total["forward_passes"] == 2 and total["memory_hits"] == 2


def test_images_are_routed_by_their_digest() -> None:
    transports = _transports(3)
    client = SegmentationClient(transports)
    images = [random_image(seed) for seed in range(12)]
    for image in images:
        client.segment(image, "p0")
    for index, transport in enumerate(transports):
        expected = sum(int(image_digest(im)[:16], 16) % 3 == index for im in images)
        assert len(transport.serves) == expected


def test_an_unavailable_worker_is_retried_until_it_answers() -> None:
    (transport,) = _transports(1, failures=2)
    client = SegmentationClient([transport], retry_timeout_s=30)
    seg = client.segment(random_image(3), "p0")
    assert seg.mask.shape == (64, 64)
    assert transport.resets == 2 and client.stats()["client"]["retries"] == 2


def test_a_worker_that_never_comes_back_fails_with_a_clear_error() -> None:
    (transport,) = _transports(1, failures=10**6)
    client = SegmentationClient([transport], retry_timeout_s=0.3)
    with pytest.raises(SegmentationWorkerUnavailableError, match="did not answer within 0 s"):
        client.segment(random_image(4), "p0")


@pytest.mark.parametrize("crashes", [2, 10])
def test_a_request_that_keeps_crashing_its_worker_fails_naming_the_image(crashes: int) -> None:
    worker = SegmentationWorker("w0", FakeBackendFactory())
    crashed = WorkerCrashed("ActorUnavailableError: Socket closed")
    transport = CountingTransport(worker, failures=crashes, error=crashed)
    client = SegmentationClient([transport], retry_timeout_s=30)
    image = random_image(7)
    if crashes < client_module.MAX_CRASHES:  # a worker that crashed twice and came back
        assert client.segment_prompts(image, ["p0", "p1"])[1].mask.shape == (64, 64)
        return
    with pytest.raises(SegmentationRequestError) as failed:
        client.segment_prompts(image, ["p0", "p1"])
    assert str(failed.value).startswith(
        f"image {image_digest(image)[:12]} (64x64), prompts ['p0', 'p1']: segmentation worker "
        "'w0' died 3 times while serving it (last: ActorUnavailableError: Socket closed)"
    )
    assert transport.attempts == client_module.MAX_CRASHES == 3


def test_a_call_without_an_answer_fails_instead_of_hanging() -> None:
    worker = SegmentationWorker("w0", FakeBackendFactory())
    timed_out = WorkerTimedOut("no answer within 900 s")
    transport = CountingTransport(worker, failures=1, error=timed_out)
    with pytest.raises(SegmentationRequestError, match=r"\['p0'\] on segmentation worker 'w0'"):
        SegmentationClient([transport]).segment(random_image(8), "p0")
    assert transport.attempts == 1  # never sent twice to a worker that may hang


def test_a_cuda_fault_outside_ray_is_raised_to_the_caller() -> None:
    import torch

    worker = SegmentationWorker("w0", FakeBackendFactory(cuda_fault_prompt="bad"))
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        worker.segment(random_image(9), "bad")
    assert worker.segment(random_image(9), "p0").mask.shape == (64, 64)


def test_in_process_workers_are_shared_by_copies_and_never_pickled() -> None:
    client = SegmentationClient.in_process([SegmentationWorker("w0", FakeBackendFactory())])
    copied: Any = copy.deepcopy(client)
    assert copied.transports[0].worker is client.transports[0].worker
    with pytest.raises(TypeError, match="cannot be sent to another one"):
        pickle.dumps(client)


def test_a_wrong_digest_from_a_remote_caller_stores_nothing() -> None:
    worker = SegmentationWorker("w0", FakeBackendFactory())
    image, other = random_image(5), random_image(6)
    with pytest.raises(ValueError, match="does not match its digest"):
        worker.serve(image_digest(other), (64, 64), ["p0"], image)
    assert worker.stats()["forward_passes"] == 0
