"""Benchmark: what one inference-cache entry costs on disk and in time, and the warm-up it serves.

Run from a checkout's root (no Ray; ~1 minute with defaults)::

    python benchmarks/bench_cache.py
    python benchmarks/bench_cache.py --images 20 --prompts 11

To compare two versions of the code, run this same file with each checkout first on the path
(it uses only ``InferenceCache.put/get/path`` and ``SegmentationWorker``, which both have)::

    (cd /tmp/main-checkout && PYTHONPATH=. python /path/to/benchmarks/bench_cache.py)

On the synthetic 512x512 angiograms with the Frangi backend (``--prompts`` of the candidate
prompts on ``--images`` images), it prints:

- **bytes per entry** on disk (the cache dir's entry files over their count);
- **write ms per entry**: ``InferenceCache.put`` of a backend answer (compaction, encoding, the
  atomic write with its fsync), memory tier off;
- **read ms per entry**: ``InferenceCache.get`` from disk by a fresh cache (read and decode), and
  from the memory tier;
- **warm-up wall** of an in-process :class:`SegmentationWorker` serving every (image, prompt)
  pair, on a cold cache (every pair a Frangi forward pass plus a write) and, with a new worker,
  on the warm cache (every pair a disk hit): the warm-up stage's work without Ray's transport.

Wall times depend on the machine's load; bytes are exact.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from envs.synthetic import generate_samples
from models.frangi import FrangiSegmenter
from models.prompts import CANDIDATE_PROMPTS
from models.segmentation import image_digest
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.cache import CacheKey, InferenceCache
from orchestrator.inference.worker import SegmentationWorker

ENTRY_SUFFIXES = (".npz", ".entry")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10, help="synthetic 512x512 angiograms")
    parser.add_argument("--prompts", type=int, default=11, help="candidate prompts per image")
    return parser.parse_args()


def entry_bytes(root: Path) -> list[int]:
    """Sizes of the cache entry files under ``root`` (either format)."""
    return [p.stat().st_size for p in root.rglob("*") if p.name.endswith(ENTRY_SUFFIXES)]


def warm_up_wall(cache_dir: Path, images: list, prompts: list[str]) -> tuple[float, dict]:
    """Seconds a fresh in-process worker takes to serve every pair, and its counters."""
    worker = SegmentationWorker("bench", BackendSpec("frangi"), str(cache_dir))
    start = time.perf_counter()
    for image in images:
        worker.segment_prompts(image, prompts)
    return time.perf_counter() - start, worker.stats()


def per_entry_ms(root: Path, answers: list) -> tuple[float, float, float]:
    """Median ms of a disk write, a disk read and a memory read per entry."""
    writer = InferenceCache(root, memory_bytes=0)
    writes = []
    for key, seg in answers:
        start = time.perf_counter()
        writer.put(key, seg)
        writes.append(time.perf_counter() - start)
    reader = InferenceCache(root)
    disk, memory = [], []
    for key, seg in answers:
        for times in (disk, memory):  # the first get reads the disk, the second the memory
            start = time.perf_counter()
            hit = reader.get(key, seg.mask.shape)
            times.append(time.perf_counter() - start)
            assert hit is not None
    return tuple(1e3 * statistics.median(t) for t in (writes, disk, memory))  # type: ignore[return-value]


def main() -> None:
    args = parse_args()
    images = [s.image for s in generate_samples(args.images)]
    prompts = list(CANDIDATE_PROMPTS)[: args.prompts]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp)
        cold, cold_stats = warm_up_wall(root / "warmup", images, prompts)
        warm, warm_stats = warm_up_wall(root / "warmup", images, prompts)
        sizes = entry_bytes(root / "warmup")
        frangi = FrangiSegmenter()
        answers = [
            (CacheKey("bench", image_digest(image), p), frangi.segment(image, p))
            for image in images
            for p in prompts
        ]
        write_ms, disk_ms, memory_ms = per_entry_ms(root / "entries", answers)
    pairs = len(images) * len(prompts)
    print(f"{len(images)} synthetic 512x512 images x {len(prompts)} prompts = {pairs} entries")
    print(f"bytes per entry on disk   {statistics.mean(sizes):12,.0f}  ({len(sizes)} files)")
    print(f"write ms per entry        {write_ms:12.2f}  (median; put, fsync included)")
    print(f"read ms per entry, disk   {disk_ms:12.2f}  (median; a fresh cache's get)")
    print(f"read ms per entry, memory {memory_ms:12.2f}  (median)")
    print(
        f"warm-up wall, cold cache  {cold:12.2f} s  ({cold_stats['forward_passes']} forward passes)"
    )
    print(f"warm-up wall, warm cache  {warm:12.2f} s  ({warm_stats['disk_hits']} disk hits)")


if __name__ == "__main__":
    main()
