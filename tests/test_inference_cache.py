"""The segmentation result cache and the worker body, in-process (no Ray).

Exact behaviour: key changes, bit-identical round trips through memory and disk, LRU eviction by
bytes, every kind of corrupt disk entry detected/deleted/counted/recomputed, one forward pass per
pair under concurrency, and the OOM back-off down to its floor.
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeBackendFactory, FakeSegmenter, fake_answer, random_image, read_events

from models.segmentation import Segmentation, image_digest
from orchestrator.inference.backend_spec import BackendSpec, describe_factory
from orchestrator.inference.cache import (
    CacheKey,
    InferenceCache,
    MemoryLRU,
    canonical,
)
from orchestrator.inference.cache_entry import LEVELS, compact, encode, quantise
from orchestrator.inference.stats import aggregate_stats, percentile
from orchestrator.inference.worker import SegmentationOutOfMemoryError, SegmentationWorker

PROMPT = "segment the blood vessel"


def _seg(seed: int, size: int = 16, prob: bool = True, score: float | None = 0.25) -> Segmentation:
    rng = np.random.default_rng(seed)
    p = rng.random((size, size), dtype=np.float32)
    return Segmentation(mask=p > 0.5, prob=p if prob else None, score=score, flags=("a", "b"))


def _assert_identical(a: Segmentation, b: Segmentation) -> None:
    assert a.mask.dtype == b.mask.dtype == np.bool_
    assert a.mask.tobytes() == b.mask.tobytes()
    if a.prob is None:
        assert b.prob is None
    else:
        assert b.prob is not None and b.prob.dtype == np.float32
        assert a.prob.tobytes() == b.prob.tobytes()
    assert (a.score, a.flags) == (b.score, b.flags)
    assert type(a.score) is type(b.score)


def _key(seed: int = 0, prompt: str = PROMPT, backend: str = "fake-v1") -> CacheKey:
    return CacheKey(backend, image_digest(random_image(seed, 16)), prompt)


# --- keys -----------------------------------------------------------------------------------


def test_key_changes_with_backend_prompt_and_image_bytes() -> None:
    image = random_image(0, 16)
    base = CacheKey("fake-v1", image_digest(image), PROMPT).hex
    assert CacheKey("fake-v1", image_digest(image.copy()), PROMPT).hex == base
    assert CacheKey("fake-v2", image_digest(image), PROMPT).hex != base
    assert CacheKey("fake-v1", image_digest(image), PROMPT + " ").hex != base
    changed = image.copy()
    changed[3, 4, 1] ^= 1  # one bit of one pixel
    assert CacheKey("fake-v1", image_digest(changed), PROMPT).hex != base
    assert len({base, *(_key(s).hex for s in range(1, 4))}) == 4


def test_digest_covers_shape_and_dtype() -> None:
    flat = np.zeros(48, np.uint8)
    digests = {
        image_digest(flat.reshape(4, 4, 3)),
        image_digest(flat.reshape(2, 8, 3)),
        image_digest(flat.view(np.int8).reshape(4, 4, 3)),
    }
    assert len(digests) == 3
    image = random_image(1, 16)
    assert image_digest(image[:, ::-1]) == image_digest(np.ascontiguousarray(image[:, ::-1]))


def test_key_fields_cannot_run_into_each_other() -> None:
    assert CacheKey("a", "b", "c d").hex != CacheKey("a", "b c", "d").hex


# --- memory and disk round trips ------------------------------------------------------------


def test_memory_and_disk_hits_are_bit_identical(tmp_path: Path) -> None:
    seg, key = _seg(0), _key()
    cache = InferenceCache(tmp_path)
    assert cache.get(key, (16, 16)) is None
    stored = cache.put(key, seg)
    _assert_identical(stored, canonical(seg))
    memory_hit = cache.get(key, (16, 16))
    assert memory_hit is not None and memory_hit.tier == "memory"
    disk_hit = InferenceCache(tmp_path).get(key, (16, 16))
    assert disk_hit is not None and disk_hit.tier == "disk"
    _assert_identical(memory_hit.segmentation, stored)
    _assert_identical(disk_hit.segmentation, stored)
    assert not disk_hit.segmentation.mask.flags.writeable
    assert cache.counters()["memory_hits"] == 1 and cache.counters()["cache_misses"] == 1


@pytest.mark.parametrize("prob, score", [(False, None), (True, None), (False, 0.5)])
def test_missing_prob_and_score_round_trip(tmp_path: Path, prob: bool, score: float | None) -> None:
    seg, key = _seg(1, size=13, prob=prob, score=score), _key()  # 169 px: not a byte multiple
    InferenceCache(tmp_path).put(key, seg)
    hit = InferenceCache(tmp_path).get(key, (13, 13))
    assert hit is not None
    _assert_identical(hit.segmentation, canonical(seg))


def test_disk_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    key = _key()
    cache = InferenceCache(tmp_path)
    cache.put(key, _seg(0))
    path = cache.path(key)
    assert path == tmp_path / "v2" / key.backend_dir / key.hex[:2] / f"{key.hex}.entry"
    assert path.exists()
    assert (tmp_path / "v2" / key.backend_dir / "BACKEND_ID.txt").read_text() == "fake-v1\n"
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []


def test_staged_entry_is_served_until_flushed_to_disk(tmp_path: Path) -> None:
    # A worker stages under its model lock and flushes after it: meanwhile the result must be
    # found (even without a memory tier), and afterwards be on disk and no longer held.
    key, seg = _key(), _seg(0)
    cache = InferenceCache(tmp_path, memory_bytes=0)
    stored = cache.stage(key, seg)
    path = cache.path(key)
    assert path is not None and not path.exists()
    hit = cache.get(key, (16, 16))
    assert hit is not None and hit.tier == "memory"
    _assert_identical(hit.segmentation, stored)
    cache.flush(key)
    assert path.exists() and cache.get(key, (16, 16)) is not None  # now from disk
    assert cache.counters()["disk_hits"] == 1 and cache.counters()["cache_misses"] == 1
    cache.flush(key)  # nothing staged: no-op


def test_failed_flush_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = InferenceCache(tmp_path / "file", memory_bytes=0)
    cache.stage(_key(), _seg(0))
    cache.flush(_key())
    assert cache.counters()["disk_write_errors"] == 1


def test_memory_only_cache_without_dir() -> None:
    cache = InferenceCache(None)
    cache.put(_key(), _seg(0))
    assert cache.path(_key()) is None
    assert InferenceCache(None).get(_key(), (16, 16)) is None


def test_lru_evicts_least_recently_used_by_bytes() -> None:
    one = compact(_seg(0, size=10))  # 13 mask-bit bytes + 100 prob levels
    lru = MemoryLRU(max_bytes=226)
    lru.put("a", one)
    lru.put("b", one)
    assert lru.get("a") is one  # "a" becomes the most recent
    lru.put("c", one)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (one, None, one)
    assert (len(lru), lru.nbytes) == (2, 226)
    lru.put("huge", compact(_seg(1, size=16)))  # larger than the whole budget: not kept
    assert lru.get("huge") is None and len(lru) == 2


# --- the compact form -----------------------------------------------------------------------


def test_quantise_keeps_the_half_threshold_and_half_a_level() -> None:
    half = np.float32(0.5)
    edges = [0.0, 1.0, half, np.nextafter(half, np.float32(1)), np.nextafter(half, np.float32(0))]
    prob = np.concatenate([np.float32(edges), np.random.default_rng(0).random(10_000, np.float32)])
    expanded = LEVELS[quantise(prob)]
    assert np.array_equal(expanded > 0.5, prob > 0.5)
    assert float(np.abs(expanded - prob).max()) <= 1 / 510 + 1e-7
    assert (expanded[0], expanded[1]) == (0.0, 1.0)
    assert LEVELS[127] < 0.5 < LEVELS[128]


def test_frangi_entry_is_over_five_times_smaller_and_keeps_its_mask(tmp_path: Path) -> None:
    from envs.synthetic import generate_samples
    from models.frangi import FrangiSegmenter

    image = generate_samples(1)[0].image
    seg = FrangiSegmenter().segment(image, PROMPT)
    key = CacheKey("frangi", image_digest(image), PROMPT)
    cache = InferenceCache(tmp_path)
    stored = cache.put(key, seg)
    path = cache.path(key)
    assert path is not None and image.shape[:2] == (512, 512)
    assert path.stat().st_size * 5 < 512 * 512 * 4  # float32 prob alone was 1 MiB
    assert stored.prob is not None and seg.prob is not None
    assert np.array_equal(stored.mask, seg.mask)
    assert np.array_equal(stored.prob > 0.5, seg.prob > 0.5)


def test_read_error_keeps_the_entry_and_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _key()
    InferenceCache(tmp_path).put(key, _seg(0))
    cache = InferenceCache(tmp_path)
    path = cache.path(key)
    assert path is not None

    def unreadable(self: Path) -> bytes:
        raise OSError(errno.ESTALE, "Stale file handle", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_bytes", unreadable)
        assert cache.get(key, (16, 16)) is None
    assert path.exists()
    assert cache.counters()["disk_read_errors"] == 1 and cache.counters()["corrupt_entries"] == 0
    hit = InferenceCache(tmp_path).get(key, (16, 16))
    assert hit is not None
    _assert_identical(hit.segmentation, canonical(_seg(0)))


def test_failed_unlink_of_a_corrupt_entry_is_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = _key()
    InferenceCache(tmp_path).put(key, _seg(0))
    cache = InferenceCache(tmp_path)
    path = cache.path(key)
    assert path is not None
    _garbage(path)

    def read_only_dir(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", read_only_dir)
    with caplog.at_level(logging.WARNING, logger="orchestrator.inference.cache"):
        assert cache.get(key, (16, 16)) is None
    assert cache.counters()["corrupt_entries"] == 1
    assert "could not delete" in caplog.text
    assert cache.put(key, _seg(0)) is not None  # the request is still answered and stored


# --- corrupt entries ------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an entry at all")


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper_prob_keep_checksum(path: Path) -> None:
    # A payload whose levels differ by one, under the original entry's (now stale) sha256.
    entry = compact(_seg(0))
    assert entry.prob_levels is not None
    fine = encode(path.stem, entry)
    tampered = encode(path.stem, entry._replace(prob_levels=entry.prob_levels ^ np.uint8(1)))
    at = _digest_offset(fine)
    path.write_bytes(tampered[:at] + fine[at : at + 32] + tampered[at + 32 :])


def _digest_offset(data: bytes) -> int:
    return 12 + int.from_bytes(data[8:12], "little")


def _other_key_moved_here(path: Path) -> None:
    path.write_bytes(encode(_key(seed=9).hex, compact(_seg(0))))


def _wrong_shape(path: Path) -> None:
    path.write_bytes(encode(path.stem, compact(_seg(0, size=8))))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _garbage,
        _flip_middle_byte,
        _tamper_prob_keep_checksum,
        _other_key_moved_here,
        _wrong_shape,
    ],
)
def test_corrupt_entry_is_deleted_counted_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    key = _key()
    path = InferenceCache(tmp_path).path(key)
    assert path is not None
    InferenceCache(tmp_path).put(key, _seg(0))
    damage(path)  # type: ignore[operator]
    cache = InferenceCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="orchestrator.inference.cache"):
        assert cache.get(key, (16, 16)) is None
    assert cache.counters()["corrupt_entries"] == 1
    assert not path.exists()
    assert "corrupt entry" in caplog.text and path.name in caplog.text
    cache.put(key, _seg(0))  # recomputed and stored again
    hit = InferenceCache(tmp_path).get(key, (16, 16))
    assert hit is not None
    _assert_identical(hit.segmentation, canonical(_seg(0)))


def test_worker_recomputes_a_torn_entry(tmp_path: Path) -> None:
    events = str(tmp_path / "events.jsonl")
    factory = FakeBackendFactory(events_path=events)
    image = random_image(3)
    first = SegmentationWorker("w", factory, str(tmp_path / "cache")).segment(image, PROMPT)
    (entry,) = (tmp_path / "cache").rglob("*.entry")
    _truncate(entry)
    worker = SegmentationWorker("w", factory, str(tmp_path / "cache"))
    again = worker.segment(image, PROMPT)
    _assert_identical(again, first)
    _assert_identical(again, canonical(fake_answer(image, PROMPT)))
    stats = worker.stats()
    assert (stats["corrupt_entries"], stats["forward_passes"], stats["disk_hits"]) == (1, 1, 0)
    assert len(read_events(events, "forward")) == 2 and len(read_events(events, "load")) == 2


# --- the worker body without Ray ------------------------------------------------------------


def test_worker_counts_tiers_and_serves_prompts_in_order(tmp_path: Path) -> None:
    worker = SegmentationWorker("w", FakeBackendFactory(), str(tmp_path))
    image = random_image(4)
    prompts = ["p1", "p2", "p1"]
    results = worker.segment_prompts(image, prompts)
    for prompt, seg in zip(prompts, results, strict=True):
        _assert_identical(seg, canonical(fake_answer(image, prompt)))
    fresh = SegmentationWorker("w2", FakeBackendFactory(), str(tmp_path))
    fresh.segment(image, "p2")
    stats, fresh_stats = worker.stats(), fresh.stats()
    assert (stats["requests"], stats["forward_passes"], stats["memory_hits"]) == (3, 2, 1)
    assert (fresh_stats["forward_passes"], fresh_stats["disk_hits"]) == (0, 1)
    assert stats["queue_length"] == 0 and stats["restarts"] == 0
    assert stats["backend_id"] == "fake-v1:cap-none"


def test_lookup_by_digest_serves_only_cached_answers(tmp_path: Path) -> None:
    worker = SegmentationWorker("w", FakeBackendFactory(), str(tmp_path))
    image = random_image(4)
    computed = worker.segment(image, "p1")
    found = worker.lookup(image_digest(image), (64, 64), ["p1", "p2"])
    assert found[1] is None and found[0] is not None
    _assert_identical(found[0], computed)
    assert worker.lookup(image_digest(image), (32, 32), ["p1"]) == [None]  # shape is checked
    stats = worker.stats()
    assert (stats["requests"], stats["forward_passes"], stats["memory_hits"]) == (2, 1, 1)


def test_factory_description_is_stable() -> None:
    assert describe_factory(FakeBackendFactory(latency_s=0.5)) == (
        "FakeBackendFactory(backend_id='fake-v1', latency_s=0.5, events_path=None, "
        "oom_above=None, cuda_fault_prompt=None)"
    )
    assert describe_factory(random_image) == "fakes.random_image"  # type: ignore[arg-type]
    assert describe_factory(BackendSpec("frangi", {"sigma": 2})) == (
        "BackendSpec(name='frangi', options={'sigma': 2})"
    )


def test_concurrent_requests_for_one_pair_run_the_model_once(tmp_path: Path) -> None:
    events = str(tmp_path / "events.jsonl")
    worker = SegmentationWorker("w", FakeBackendFactory(latency_s=0.05, events_path=events), None)
    image = random_image(5)
    results: list[Segmentation] = []
    threads = [
        threading.Thread(target=lambda: results.append(worker.segment(image, PROMPT)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_events(events, "forward")) == 1
    assert worker.stats()["forward_passes"] == 1 and worker.stats()["memory_hits"] == 5
    for seg in results:
        _assert_identical(seg, results[0])


def test_oom_halves_the_cap_retries_and_flags(tmp_path: Path) -> None:
    image = random_image(6, size=512)
    worker = SegmentationWorker("w", FakeBackendFactory(oom_above=300), str(tmp_path))
    seg = worker.segment(image, PROMPT)
    expected = fake_answer(image, PROMPT, effective_side=256)
    assert seg.mask.tobytes() == expected.mask.tobytes()
    assert seg.flags == ("fake", "oom_input_cap=256")
    stats = worker.stats()
    assert (stats["oom_retries"], stats["oom_failures"], stats["input_cap"]) == (1, 0, 256)
    # The pool's id stays the configured one; the result is cached under the lowered one.
    assert worker.backend_id() == "fake-v1:cap-none"
    assert worker.segment(image, PROMPT).flags == seg.flags
    assert worker.stats()["forward_passes"] == 1


def test_oom_below_the_floor_fails_clearly(tmp_path: Path) -> None:
    image = random_image(7, size=512)
    worker = SegmentationWorker("w", FakeBackendFactory(oom_above=100), None, min_input_cap=256)
    with pytest.raises(SegmentationOutOfMemoryError, match=r"512x512 image.*\(floor 256 px\)"):
        worker.segment(image, PROMPT)
    stats = worker.stats()
    assert (stats["oom_retries"], stats["oom_failures"], stats["forward_passes"]) == (1, 1, 0)
    assert stats["model_errors"] == 1


def test_oom_without_a_cap_hook_retries_once(tmp_path: Path) -> None:
    class NoCap:
        def __init__(self) -> None:
            self.inner = FakeSegmenter(oom_above=100)
            self.calls = 0

        @property
        def backend_id(self) -> str:
            return "nocap"

        def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
            self.calls += 1
            return self.inner.segment(image, prompt)

    backend = NoCap()
    worker = SegmentationWorker("w", lambda: backend, None)
    with pytest.raises(SegmentationOutOfMemoryError):
        worker.segment(random_image(8, size=128), PROMPT)
    assert backend.calls == 2
    assert (worker.stats()["oom_retries"], worker.stats()["oom_failures"]) == (1, 1)


def test_initial_input_cap_is_applied_and_not_flagged() -> None:
    worker = SegmentationWorker("w", FakeBackendFactory(), None, input_cap=32)
    image = random_image(9, size=64)
    seg = worker.segment(image, PROMPT)
    assert seg.flags == ("fake",)
    assert seg.mask.tobytes() == fake_answer(image, PROMPT, 32).mask.tobytes()
    assert worker.backend_id() == "fake-v1:cap-32"


def test_bad_image_is_rejected_before_the_model() -> None:
    worker = SegmentationWorker("w", FakeBackendFactory(), None)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        worker.segment(np.zeros((8, 8), np.uint8), PROMPT)
    with pytest.raises(ValueError, match="float32"):
        worker.segment(np.zeros((8, 8, 3), np.float32), PROMPT)


# --- statistics -----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (
        10.0,
        19.0,
        20.0,
    )
    assert percentile([], 50) is None and percentile([7.0], 95) == 7.0


def test_aggregate_sums_counters_and_takes_worst_latency() -> None:
    a = SegmentationWorker("a", FakeBackendFactory(), None)
    a.segment(random_image(1), PROMPT)
    a.segment(random_image(1), PROMPT)
    b = SegmentationWorker("b", FakeBackendFactory(), None)
    b.segment(random_image(2), PROMPT)
    sa, sb = a.stats(), b.stats()
    total = aggregate_stats([sa, sb])
    assert (total["requests"], total["forward_passes"], total["memory_hits"]) == (3, 2, 1)
    assert total["latency_ms_p95_worst"] == max(sa["latency_ms_p95"], sb["latency_ms_p95"])
    assert total["workers"] == 2
