"""Segmentation workers and their client on a local Ray (2 logical CPUs, no dashboard).

Pins the issue's failure behaviours with the deterministic fake backend: forward passes equal
distinct pairs across concurrent clients in other actors, a worker killed mid-stream answers
every request identically after its restart, OOM is retried at a lower cap or fails clearly, a
new pool on the same cache directory runs no forward pass, a request that crashes its worker
fails after a bounded number of restarts naming the image and prompt, two runs on one cluster
keep their own workers and counters, and a pool has one input cap.
"""

from __future__ import annotations

import gc
import itertools
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakes
import numpy as np
import pytest
import ray
from fakes import FakeBackendFactory, RequestReplayer, fake_answer, random_image, read_events

from models.errors import UserError
from models.segmentation import Segmentation, image_digest
from orchestrator.inference.client import (
    NAMESPACE,
    SegmentationClient,
    SegmentationRequestError,
    SegmentationWorkerUnavailableError,
)
from orchestrator.inference.pool import (
    WorkerPlacement,
    run_prefix,
    run_workers,
    shutdown_workers,
    start_workers,
)
from orchestrator.inference.worker import SegmentationOutOfMemoryError
from orchestrator.run_id import new_run_id

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROMPTS = ["p0", "p1", "p2", "p3"]
_pool_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Workers cannot import the tests directory: ship the fakes by value.
    ray.cloudpickle.register_pickle_by_value(fakes)
    yield
    ray.shutdown()


StartPool = Callable[..., list[str]]


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[StartPool]:
    """Start a pool under a fresh name prefix; every pool is shut down after the test."""
    started: list[list[str]] = []

    def start(n: int, factory: FakeBackendFactory, **kwargs: Any) -> list[str]:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        names = start_workers(n, factory, name_prefix=f"test-pool-{next(_pool_ids)}", **kwargs)
        started.append(names)
        return names

    yield start
    for names in started:
        shutdown_workers(names)


def _replayer(client: SegmentationClient) -> Any:
    """A RequestReplayer actor holding its own copy of ``client``."""
    actor_class: Any = ray.remote(num_cpus=0)(RequestReplayer)
    return actor_class.remote(client)


def _assert_identical(got: Segmentation, want: Segmentation) -> None:
    assert got.mask.tobytes() == want.mask.tobytes()
    assert want.prob is not None and got.prob is not None
    assert got.prob.tobytes() == want.prob.tobytes()
    assert (got.score, got.flags) == (want.score, tuple(want.flags))


def _expected(seed: int, prompt: str) -> Segmentation:
    return fake_answer(random_image(seed), prompt)


def test_concurrent_clients_in_actors_run_each_pair_once(
    tmp_path: Path, start_pool: StartPool
) -> None:
    events = str(tmp_path / "events.jsonl")
    names = start_pool(2, FakeBackendFactory(latency_s=0.02, events_path=events))
    client = SegmentationClient(names)
    rng = random.Random(0)
    first = [(s, p) for s in range(0, 6) for p in PROMPTS[:3]] * 2
    second = [(s, p) for s in range(3, 9) for p in PROMPTS[1:]] * 2
    rng.shuffle(first)
    rng.shuffle(second)
    callers = [_replayer(client) for _ in range(2)]
    answers = ray.get(
        [c.run.remote(reqs) for c, reqs in zip(callers, (first, second), strict=True)]
    )

    distinct = set(first) | set(second)
    assert len(read_events(events, "forward")) == len(distinct) == 30
    assert client.stats()["total"]["forward_passes"] == len(distinct)
    for reqs, got in zip((first, second), answers, strict=True):
        for (seed, prompt), seg in zip(reqs, got, strict=True):
            _assert_identical(seg, _expected(seed, prompt))
    assert len(read_events(events, "load")) == 2  # one per worker


def test_killed_worker_answers_every_request_identically(
    tmp_path: Path, start_pool: StartPool
) -> None:
    events = str(tmp_path / "events.jsonl")
    (name,) = start_pool(1, FakeBackendFactory(latency_s=0.1, events_path=events))
    requests = [(s, p) for s in range(6) for p in PROMPTS[:2]]
    caller = _replayer(SegmentationClient([name]))
    pending = caller.run.remote(requests)
    while len(read_events(events, "forward")) < 4:  # kill in the middle of the stream
        time.sleep(0.02)
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)
    answers = ray.get(pending, timeout=60)

    for (seed, prompt), seg in zip(requests, answers, strict=True):
        _assert_identical(seg, _expected(seed, prompt))
    forwards = read_events(events, "forward")
    assert {(e["image"], e["prompt"]) for e in forwards} == {
        (_image_crc(s), p) for s, p in requests
    }
    assert len(forwards) <= len(requests) + 1  # at most the interrupted call ran twice
    assert len(read_events(events, "load")) == 2  # the backend loads once per incarnation
    stats = SegmentationClient([name]).stats()
    assert stats["total"]["restarts"] == 1
    # Answers computed before the kill came from the disk cache after the restart.
    assert stats["total"]["forward_passes"] + stats["total"]["disk_hits"] >= 1


def _image_crc(seed: int) -> int:
    import zlib

    return zlib.crc32(random_image(seed).tobytes())


def test_injected_oom_is_retried_at_a_lower_cap(start_pool: StartPool) -> None:
    names = start_pool(1, FakeBackendFactory(oom_above=300))
    client = SegmentationClient(names)
    image = random_image(1, size=512)
    seg = client.segment(image, "p0")
    want = fake_answer(image, "p0", effective_side=256)
    assert seg.mask.tobytes() == want.mask.tobytes()
    assert seg.flags == ("fake", "oom_input_cap=256")
    total = client.stats()["total"]
    assert (total["oom_retries"], total["oom_failures"], total["forward_passes"]) == (1, 0, 1)
    assert client.backend_id == "fake-v1:cap-none"


def test_oom_below_the_floor_fails_that_request_clearly(start_pool: StartPool) -> None:
    names = start_pool(1, FakeBackendFactory(oom_above=100), min_input_cap=256)
    client = SegmentationClient(names)
    with pytest.raises(SegmentationOutOfMemoryError, match=r"floor 256 px"):
        client.segment(random_image(2, size=512), "p0")
    assert client.segment(random_image(3, size=64), "p0").mask.shape == (64, 64)  # still serving
    total = client.stats()["total"]
    assert (total["oom_retries"], total["oom_failures"], total["forward_passes"]) == (1, 1, 1)


def test_disk_cache_serves_a_new_pool_without_forward_passes(
    tmp_path: Path, start_pool: StartPool
) -> None:
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(events_path=events)
    pairs = [(s, p) for s in range(4) for p in PROMPTS[:2]]
    first_pool = start_pool(2, factory)
    first = [SegmentationClient(first_pool).segment(random_image(s), p) for s, p in pairs]
    shutdown_workers(first_pool)

    second = SegmentationClient(start_pool(2, factory))
    answers = [second.segment_prompts(random_image(s), PROMPTS[:2]) for s in range(4)]
    flat = [seg for per_image in answers for seg in per_image]
    for got, want in zip(flat, first, strict=True):
        _assert_identical(got, want)
    total = second.stats()["total"]
    assert (total["forward_passes"], total["disk_hits"]) == (0, len(pairs))
    assert len(read_events(events, "forward")) == len(pairs)


def test_client_memo_pickling_and_errors(start_pool: StartPool) -> None:
    names = start_pool(1, FakeBackendFactory())
    client = SegmentationClient(names, memo_entries=4)
    image = random_image(5)
    a = client.segment(image, "p0")
    assert client.segment(image, "p0") is a  # memo hit: no round trip
    stats = client.stats()
    assert (stats["client"]["memo_hits"], stats["total"]["requests"]) == (1, 1)
    assert stats["workers"][0]["worker"] == names[0]

    import pickle

    clone = pickle.loads(pickle.dumps(client))
    _assert_identical(clone.segment(image, "p0"), a)
    assert clone.stats()["total"]["memory_hits"] == 1

    with pytest.raises(UserError, match="already exists with backend"):
        start_workers(1, FakeBackendFactory(latency_s=1.0), None, name_prefix=names[0][:-2])
    # Drop the worker's outputs first: Ray 2.60 treats outputs of a killed actor that are still
    # referenced as lost and restarts the actor to rebuild them (lineage reconstruction), and
    # two such restarts can race and crash its GCS. A run never kills workers it still reads.
    del a, clone
    client._memo.clear()
    gc.collect()
    shutdown_workers(names)
    with pytest.raises(SegmentationWorkerUnavailableError, match="does not exist"):
        client.segment(random_image(6), "p0")
    with pytest.raises(ValueError, match="uint8"):
        client.segment(np.zeros((4, 4)), "p0")


def test_a_request_that_crashes_its_worker_fails_clearly_and_the_worker_serves_on(
    tmp_path: Path, start_pool: StartPool
) -> None:
    """A CUDA error other than OOM ends the worker's process (Ray restarts it clean); the
    request that causes it every time fails after MAX_CRASHES restarts, naming image and
    prompt, instead of being retried forever."""
    events = str(tmp_path / "events.jsonl")
    names = start_pool(1, FakeBackendFactory(events_path=events, cuda_fault_prompt="poison"))
    client = SegmentationClient(names)
    image = random_image(11)
    with pytest.raises(SegmentationRequestError) as failed:
        client.segment(image, "poison")
    assert str(failed.value).startswith(
        f"image {image_digest(image)[:12]} (64x64), prompts ['poison']: segmentation worker "
        f"{names[0]!r} died 3 times while serving it"
    )
    _assert_identical(client.segment(image, "p0"), _expected(11, "p0"))
    assert client.stats()["total"]["restarts"] == 3
    assert len(read_events(events, "load")) == 4  # a fresh process (and CUDA context) each time


def test_two_runs_on_one_cluster_keep_their_own_workers(tmp_path: Path) -> None:
    """Each run's workers are named under its id: the runs share the disk cache, never a
    worker or a counter, and the shorter run's end leaves the longer one serving."""
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(events_path=events)
    short, long = new_run_id(), new_run_id()
    pools = {
        run: start_workers(n, factory, tmp_path / "cache", name_prefix=run_prefix(run))
        for run, n in ((short, 2), (long, 1))
    }
    try:
        assert run_workers(short) == [f"{short}:segmentation-worker-{i}" for i in range(2)]
        assert run_workers(long) == [f"{long}:segmentation-worker-0"]
        first, second = SegmentationClient.for_run(short), SegmentationClient.for_run(long)
        for seed in range(4):
            first.segment(random_image(seed), "p0")
        second.segment(random_image(9), "p0")
        second.segment(random_image(0), "p0")  # computed by the other run: from the disk
        assert first.stats()["total"]["forward_passes"] == 4
        total = second.stats()["total"]
        assert (total["forward_passes"], total["disk_hits"]) == (1, 1)
        shutdown_workers(pools.pop(short))  # the shorter run ends
        _assert_identical(second.segment(random_image(10), "p1"), _expected(10, "p1"))
        with pytest.raises(SegmentationWorkerUnavailableError, match=f"run {short} has no"):
            run_workers(short)
    finally:
        for names in pools.values():
            shutdown_workers(names)


def test_a_run_restarted_with_fewer_workers_finds_its_pool_by_its_id(tmp_path: Path) -> None:
    run = new_run_id()
    cache = tmp_path / "cache"
    names = start_workers(2, FakeBackendFactory(), cache, name_prefix=run_prefix(run))
    assert len(SegmentationClient.for_run(run).transports) == 2
    shutdown_workers(names)  # the first attempt ends
    names = start_workers(1, FakeBackendFactory(), cache, name_prefix=run_prefix(run))
    try:
        client = SegmentationClient.for_run(run)
        assert client.worker_names == [f"{run}:segmentation-worker-0"]
        _assert_identical(client.segment(random_image(3), "p0"), _expected(3, "p0"))
    finally:
        shutdown_workers(names)


def test_workers_planned_with_different_caps_share_the_smallest(start_pool: StartPool) -> None:
    placements = [WorkerPlacement(input_cap=1024), WorkerPlacement(input_cap=512)]
    client = SegmentationClient(start_pool(2, FakeBackendFactory(), placements=placements))
    assert client.backend_id == "fake-v1:cap-512"  # both workers: no refusal
    assert [w["backend_id"] for w in client.stats()["workers"]] == ["fake-v1:cap-512"] * 2
