"""Benchmark: what the shared segmentation workers and their cache cost per step, and save.

Run (from the repository root, on a machine with Ray; takes about 2-3 minutes with defaults)::

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --steps 5000 --latency-ms 400 --workers 2 --envs 2

The backend is the tests' deterministic fake (``tests/fakes.py``) whose forward pass sleeps
``--latency-ms`` (default 400 ms: a **simulation** of one Sa2VA forward pass on a GPU; the fake's
own compute is a few ms of numpy). Images are 512x512 RGB like the angiography frames.

(a) Median per-step cost, in microseconds, of a *cached* ``segment`` call through the client
    (served by its local memo; by a worker's memory tier over a Ray round trip; by a worker's
    disk tier), next to calling the in-process fake backend directly (latency 0).
(b) The same RL steps (``--images`` images x the 11 candidate prompts, episodes of
    ``--episode-len`` steps on one random image, one random prompt per step, fixed ``--seed``)
    driven by ``--envs`` env actors in parallel:
    - "original": a forward pass on every step, each env with its own model. Its wall time is
      computed, not run (it would take steps x latency / envs): passes x (latency + the measured
      cost of a direct backend call) / envs.
    - "shared workers + cache": measured end to end on ``--workers`` workers, fresh cache dir.
    - "next run": the same steps on a new worker pool reading the same cache dir, measured.

What to expect (measured on a shared 2-core CPU box, Ray 2.60): a cached step costs ~0.4 ms
through the memo, ~2.5-3 ms through a worker's memory tier and ~4 ms through its disk tier,
against 400 ms for the forward pass it replaces. 1,000 steps in 3-step episodes draw ~430 of the
550 pairs: ~2.3x fewer forward passes; with 2 envs on 2 workers the wall time gains only ~1.5x
because routing by image hash sends both envs to the same worker about half of the time. 5,000
steps (the original run) with 1 env and 1 worker: 550 passes instead of 5,000 (9x), ~4 minutes
instead of ~34. A next run on the warm disk cache runs no forward pass at all.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fakes
from fakes import FakeBackendFactory, FakeSegmenter, random_image

from models.prompts import CANDIDATE_PROMPTS
from orchestrator.inference.client import (
    SegmentationClient,
)
from orchestrator.inference.pool import shutdown_workers, start_workers

IMAGE_SIZE = 512


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="RL steps in part (b)")
    parser.add_argument("--images", type=int, default=50, help="distinct images in part (b)")
    parser.add_argument("--episode-len", type=int, default=3, help="steps per episode (b)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=400.0,
        help="simulated forward-pass latency (Sa2VA on a GPU: ~400 ms)",
    )
    parser.add_argument("--workers", type=int, default=2, help="segmentation workers")
    parser.add_argument("--envs", type=int, default=2, help="env actors stepping in parallel")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per figure in (a)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_us(fn: Any, repeats: int) -> float:
    """Median wall time of ``fn()`` in microseconds (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def part_a(args: argparse.Namespace, cache_dir: Path) -> float:
    """Print the per-step costs; returns the direct backend call's median (µs)."""
    image, prompt = random_image(12345, IMAGE_SIZE), CANDIDATE_PROMPTS[0]
    direct = FakeSegmenter(latency_s=0.0)
    direct_us = median_us(lambda: direct.segment(image, prompt), args.repeats)

    names = start_workers(1, FakeBackendFactory(), cache_dir, name_prefix="bench-a")
    memo = SegmentationClient(names)
    rpc = SegmentationClient(names, memo_entries=0)
    memo.segment(image, prompt)  # computed once; everything below is a cache hit
    memo_us = median_us(lambda: memo.segment(image, prompt), args.repeats)
    rpc_us = median_us(lambda: rpc.segment(image, prompt), args.repeats)
    shutdown_workers(names)

    # A pool without a memory tier: every call reads the entry from disk.
    names = start_workers(
        1, FakeBackendFactory(), cache_dir, name_prefix="bench-a-disk", memory_cache_bytes=0
    )
    disk = SegmentationClient(names, memo_entries=0)
    disk_us = median_us(lambda: disk.segment(image, prompt), args.repeats)
    assert disk.stats()["total"]["forward_passes"] == 0
    shutdown_workers(names)

    print(
        f"(a) cost of one cached segment() on a {IMAGE_SIZE}x{IMAGE_SIZE} image, "
        f"median of {args.repeats} calls"
    )
    print(f"    in-process fake backend, direct call (no latency)  {direct_us:10.0f} us")
    for label, value in (
        ("client, local memo hit", memo_us),
        ("client -> worker memory tier (Ray round trip)", rpc_us),
        ("client -> worker disk tier (memory tier off)", disk_us),
    ):
        print(f"    {label:<50} {value:10.0f} us   ({value - direct_us:+.0f} us vs direct)")
    print(
        f"    a forward pass it replaces: {args.latency_ms * 1000:.0f} us "
        f"({args.latency_ms * 1000 / rpc_us:.0f}x the worker round trip)"
    )
    return direct_us


def episode_plan(args: argparse.Namespace) -> list[list[tuple[int, str]]]:
    """Per env, the (image index, prompt) of every step: episodes on one random image."""
    rng = random.Random(args.seed)
    steps: list[tuple[int, str]] = []
    while len(steps) < args.steps:
        image = rng.randrange(args.images)
        for _ in range(args.episode_len):
            steps.append((image, rng.choice(CANDIDATE_PROMPTS)))
    steps = steps[: args.steps]
    per_env = -(-len(steps) // args.envs)
    return [steps[i * per_env : (i + 1) * per_env] for i in range(args.envs)]


class EnvSimulator:
    """An env actor: asks its client for each step's segmentation, like a PPO env would."""

    def __init__(self, client: SegmentationClient, n_images: int, seed: int) -> None:
        self.client = client
        self.images = [random_image(seed * 100_000 + i, IMAGE_SIZE) for i in range(n_images)]

    def run(self, steps: list[tuple[int, str]]) -> float:
        start = time.perf_counter()
        for image, prompt in steps:
            self.client.segment(self.images[image], prompt)
        return time.perf_counter() - start


def run_steps(args: argparse.Namespace, cache_dir: Path, prefix: str) -> tuple[int, float]:
    """Forward passes and wall time of the planned steps on a fresh pool over ``cache_dir``."""
    factory = FakeBackendFactory(latency_s=args.latency_ms / 1000.0)
    names = start_workers(args.workers, factory, cache_dir, name_prefix=prefix)
    client = SegmentationClient(names)
    env_class: Any = ray.remote(num_cpus=0)(EnvSimulator)
    envs = [env_class.remote(client, args.images, args.seed) for _ in range(args.envs)]
    ray.get([env.__ray_ready__.remote() for env in envs])  # images built before the clock
    start = time.perf_counter()
    ray.get([env.run.remote(plan) for env, plan in zip(envs, episode_plan(args), strict=True)])
    wall = time.perf_counter() - start
    passes = int(client.stats()["total"]["forward_passes"])
    shutdown_workers(names)
    return passes, wall


def part_b(args: argparse.Namespace, cache_dir: Path, direct_us: float) -> None:
    plan = episode_plan(args)
    distinct = len({step for env in plan for step in env})
    cached_passes, cached_wall = run_steps(args, cache_dir, "bench-b")
    warm_passes, warm_wall = run_steps(args, cache_dir, "bench-b-next")
    original_passes = args.steps
    original_wall = original_passes * (args.latency_ms / 1000.0 + direct_us / 1e6) / args.envs

    print(
        f"\n(b) {args.steps} RL steps: {args.images} images x {len(CANDIDATE_PROMPTS)} prompts, "
        f"{args.episode_len}-step episodes, seed {args.seed}, envs: {args.envs}; "
        f"simulated Sa2VA latency {args.latency_ms:.0f} ms"
    )
    print(f"    distinct (image, prompt) pairs drawn: {distinct}")
    print(f"    {'arm':<44} {'forward passes':>14} {'wall time':>11}")
    rows = (
        ("original: a forward pass every step (computed)", original_passes, original_wall),
        (f"shared workers + cache ({args.workers} workers, measured)", cached_passes, cached_wall),
        ("next run, warm disk cache (measured)", warm_passes, warm_wall),
    )
    for label, passes, wall in rows:
        print(f"    {label:<44} {passes:>14} {wall:>10.1f}s")
    print(
        f"    forward passes per 1,000 steps: original {1000 * original_passes / args.steps:.0f}, "
        f"cached {1000 * cached_passes / args.steps:.0f}, "
        f"next run {1000 * warm_passes / args.steps:.0f}"
    )
    print(
        f"    ratios: {original_passes / max(cached_passes, 1):.2f}x fewer forward passes, "
        f"{original_wall / cached_wall:.2f}x less wall time; next run "
        f"{original_wall / warm_wall:.0f}x less wall time than the original"
    )


def main() -> None:
    args = parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(fakes)
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        direct_us = part_a(args, Path(tmp) / "cache_a")
        part_b(args, Path(tmp) / "cache_b", direct_us)
    ray.shutdown()


if __name__ == "__main__":
    main()
