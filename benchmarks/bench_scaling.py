"""Benchmark: does the cache warm-up get N times faster with N segmentation workers?

Run (from the repository root; about a minute with the defaults)::

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --workers 1 2 4 8 --images 96 --latency-ms 100
    python benchmarks/bench_scaling.py --sequential     # also the one-image-at-a-time loop

The backend is the tests' deterministic fake (``tests/fakes.py``) whose forward pass sleeps
``--latency-ms`` (default 50 ms; Sa2VA on a GPU takes ~400 ms): a sleep, not computation, so
N workers can overlap on a 2-core machine the way N GPUs would. The fixed work is ``--images``
seeded random images (``--size`` px) x the 11 candidate prompts, on a cold cache (a fresh cache
directory and a fresh pool per worker count), warmed with the run's own
:func:`~orchestrator.inference.warmup.warm_up_pool`.

For each worker count it prints the warm-up wall time, the limit ``pairs x latency / workers``
(what perfectly parallel forward passes with no overhead would take) and their ratio (1.00 is
perfect; the issue asks for <= 1.25), plus how many images a worker took from another's queue
(``share_work``) and the per-worker image counts. ``--sequential`` adds the warm-up as it was
before (one ``segment_prompts`` call per image, waiting for each): it does not get faster with
more workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fakes
from fakes import FakeBackendFactory, random_image

from models.prompts import CANDIDATE_PROMPTS
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.pool import shutdown_workers, start_workers
from orchestrator.inference.warmup import DEFAULT_WINDOW, warm_up_pool

PROMPTS = tuple(CANDIDATE_PROMPTS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=48, help="distinct images (fixed seeds)")
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="simulated forward pass")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="images in flight")
    parser.add_argument(
        "--no-share-work",
        action="store_true",
        help="strict hash routing: a worker never takes another's images",
    )
    parser.add_argument(
        "--sequential", action="store_true", help="also time the one-image-at-a-time loop"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def one_pool(args: argparse.Namespace, n: int, cache: Path, sequential: bool) -> tuple:
    """Warm a cold cache with ``n`` workers; returns (wall s, report or None, forward passes)."""
    factory = FakeBackendFactory(latency_s=args.latency_ms / 1000.0)
    prefix = f"bench-scaling-{n}-{'seq' if sequential else 'par'}"
    names = start_workers(n, factory, cache, name_prefix=prefix)
    client = SegmentationClient(names)
    images = [random_image(args.seed * 100_000 + i, args.size) for i in range(args.images)]
    start = time.perf_counter()
    report = None
    if sequential:
        for image in images:
            client.segment_prompts(image, PROMPTS)
    else:
        report = warm_up_pool(
            client, images, PROMPTS, window=args.window, share_work=not args.no_share_work
        )
    wall = time.perf_counter() - start
    passes = int(client.stats()["total"]["forward_passes"])
    shutdown_workers(names)
    return wall, report, passes


def main() -> None:
    args = parse_args()
    # address="local": a new Ray of its own, never a cluster already running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(fakes)
    pairs = args.images * len(PROMPTS)
    latency = args.latency_ms / 1000.0
    print(
        f"cache warm-up of {args.images} images ({args.size} px) x {len(PROMPTS)} prompts = "
        f"{pairs} pairs, cold cache, simulated forward pass {args.latency_ms:.0f} ms (sleep), "
        f"window {args.window}, share_work {not args.no_share_work}"
    )
    header = f"  {'warm-up':<12} {'workers':>7} {'wall':>8} {'limit':>8} {'ratio':>6}"
    print(header + f" {'passes':>7} {'shared':>6}  images per worker")
    arms = [False, True] if args.sequential else [False]
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for sequential in arms:
            for n in args.workers:
                cache = Path(tmp) / f"cache-{n}-{sequential}"
                wall, report, passes = one_pool(args, n, cache, sequential)
                limit = pairs * latency / n
                shared = "-" if report is None else str(report.shared)
                per_worker = "-" if report is None else " ".join(map(str, report.images_per_worker))
                label = "sequential" if sequential else "parallel"
                print(
                    f"  {label:<12} {n:>7} {wall:>7.1f}s {limit:>7.1f}s {wall / limit:>6.2f}"
                    f" {passes:>7} {shared:>6}  {per_worker}",
                    flush=True,
                )
    ray.shutdown()


if __name__ == "__main__":
    main()
