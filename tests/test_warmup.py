"""Cache warm-up across the worker pool (``warm_up_pool``) on a local Ray, with the fake backend:
every pair computed exactly once, answers identical to the backend's, each image's prompts
computed back to back, uneven routing evened out by sharing work, a killed worker survived."""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import fakes
import pytest
import ray
from fakes import FakeBackendFactory, fake_answer, random_image, read_events

from models.segmentation import image_digest
from orchestrator.inference.client import NAMESPACE, SegmentationClient
from orchestrator.inference.pool import shutdown_workers, start_workers
from orchestrator.inference.warmup import warm_up_pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROMPTS = ["p0", "p1", "p2"]
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(fakes)
    yield
    ray.shutdown()


@pytest.fixture
def pools() -> Iterator[list[list[str]]]:
    started: list[list[str]] = []
    yield started
    for names in started:
        shutdown_workers(names)


def _pool(pools: list[list[str]], n: int, factory: FakeBackendFactory, cache: Path) -> list[str]:
    names = start_workers(n, factory, cache, name_prefix=f"test-warmup-{next(_ids)}")
    pools.append(names)
    return names


def _seeds_routed_to(worker: int, n_workers: int, count: int) -> list[int]:
    client = SegmentationClient([f"w{i}" for i in range(n_workers)])
    seeds = (s for s in itertools.count() if client.route(image_digest(random_image(s))) == worker)
    return list(itertools.islice(seeds, count))


def test_cold_then_warm_cache_every_pair_once(tmp_path: Path, pools: list[list[str]]) -> None:
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(latency_s=0.01, events_path=events)
    client = SegmentationClient(_pool(pools, 2, factory, tmp_path / "cache"))
    images = [random_image(s) for s in range(8)]
    done: list[int] = []
    report = warm_up_pool(client, [*images, images[0]], PROMPTS, on_image=lambda: done.append(1))

    assert (report.images, report.pairs, report.cached, report.computed) == (8, 24, 0, 24)
    assert sum(report.images_per_worker) == 8 and len(done) == 8
    forwards = read_events(events, "forward")
    assert len(forwards) == 24 == client.stats()["total"]["forward_passes"]
    for image in images:
        for prompt, seg in zip(PROMPTS, client.segment_prompts(image, PROMPTS), strict=True):
            want = fake_answer(image, prompt)
            assert seg.mask.tobytes() == want.mask.tobytes()
            assert want.prob is not None and seg.prob is not None
            assert seg.prob.tobytes() == want.prob.tobytes()

    again = warm_up_pool(client, images, [*PROMPTS, "p3"])
    assert (again.cached, again.computed) == (24, 8)  # only the new prompt is computed
    fresh = SegmentationClient(_pool(pools, 2, factory, tmp_path / "cache"))
    assert warm_up_pool(fresh, images, PROMPTS).computed == 0
    assert fresh.stats()["total"]["forward_passes"] == 0


def test_each_image_s_prompts_run_back_to_back(tmp_path: Path, pools: list[list[str]]) -> None:
    # Two images in flight on one worker: the model lock is held per image, not per prompt,
    # so a backend that shares work between one image's prompts (Frangi) keeps it.
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(latency_s=0.005, events_path=events)
    client = SegmentationClient(_pool(pools, 1, factory, tmp_path / "cache"))
    warm_up_pool(client, [random_image(s) for s in range(6)], PROMPTS, window=2)
    order = [e["image"] for e in read_events(events, "forward")]
    runs = [image for image, _ in itertools.groupby(order)]
    assert len(order) == 18 and len(runs) == len(set(runs)) == 6


def test_uneven_routing_is_shared_or_kept(tmp_path: Path, pools: list[list[str]]) -> None:
    seeds = _seeds_routed_to(0, 2, 6)  # every image hashes to worker 0
    images = [random_image(s) for s in seeds]
    factory = FakeBackendFactory(latency_s=0.02, events_path=str(tmp_path / "shared.jsonl"))
    client = SegmentationClient(_pool(pools, 2, factory, tmp_path / "shared"))
    report = warm_up_pool(client, images, PROMPTS)
    assert report.shared >= 2 and report.images_per_worker[1] == report.shared
    assert sum(report.images_per_worker) == 6
    assert len(read_events(tmp_path / "shared.jsonl", "forward")) == 18
    # The routed worker then serves the other's answers from the shared disk cache (the first
    # image taken is the last of worker 0's queue); both workers count those pairs as served,
    # the union counts them once.
    client.segment_prompts(images[-1], PROMPTS)
    total = client.stats()["total"]
    assert (total["forward_passes"], total["disk_hits"], total["distinct_pairs"]) == (18, 3, 21)
    assert client.stats(union_pairs=True)["total"]["distinct_pairs"] == 18

    strict = SegmentationClient(_pool(pools, 2, FakeBackendFactory(), tmp_path / "strict"))
    kept = warm_up_pool(strict, images, PROMPTS, share_work=False)
    assert (kept.shared, kept.images_per_worker) == (0, (6, 0))


def test_a_killed_worker_is_waited_for(tmp_path: Path, pools: list[list[str]]) -> None:
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(latency_s=0.05, events_path=events)
    (name,) = _pool(pools, 1, factory, tmp_path / "cache")
    client = SegmentationClient([name])
    images = [random_image(s) for s in range(4)]
    killed = []

    def kill_once() -> None:
        if not killed:
            killed.append(1)
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)
            time.sleep(0.1)

    report = warm_up_pool(client, images, PROMPTS, on_image=kill_once)
    assert report.images == 4 and report.cached + report.computed == 12
    assert {(e["image"], e["prompt"]) for e in read_events(events, "forward")} == {
        (zlib.crc32(i.tobytes()), p) for i in images for p in PROMPTS
    }
    assert len(read_events(events, "load")) == 2
