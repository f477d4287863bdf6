"""Frangi backend and oracle search speed on the default synthetic data (160 frames, seed 0).

(a) ms per (image, prompt) pair for the default prompt list:
    - before-equivalent: a fresh segmenter per pair (nothing shared between prompts);
    - after: one segmenter, every prompt of one image in a row (what a worker's cache warm-up
      asks), the access pattern the response reuse is built for.
    Both give bit-identical results (checked here too); the ratio is before / after.
(b) oracle post-processing search on test images (the default split's test videos, default
    prompt, default mask ops, depth = the default episode length 3): the exhaustive search
    (``orchestrator.evaluation.oracle_postprocess_mask``, every sequence applied from scratch)
    vs the tree search (``envs.op_search.best_ops_by_dice``); same answers (checked), wall time
    and op applications of each.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_frangi.py [--images 20] [--oracle-images 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState
from envs.op_search import best_ops_by_dice
from envs.sources import spread
from envs.split import split_groups
from envs.synthetic import generate_samples
from models.frangi import FrangiSegmenter
from models.prompts import CANDIDATE_PROMPTS, DEFAULT_PROMPT
from models.segmentation import Segmentation
from orchestrator.evaluation import oracle_postprocess_mask

DEFAULT_FRAMES, DEPTH = 160, 3


def _same(a: Segmentation, b: Segmentation) -> bool:
    assert a.prob is not None and b.prob is not None
    return a.mask.tobytes() == b.mask.tobytes() and a.prob.tobytes() == b.prob.tobytes()


def bench_pairs(samples: list) -> None:
    pairs = len(samples) * len(CANDIDATE_PROMPTS)
    start, cpu = time.perf_counter(), time.process_time()
    fresh = [[FrangiSegmenter().segment(s.image, p) for p in CANDIDATE_PROMPTS] for s in samples]
    before, before_cpu = (time.perf_counter() - start) / pairs, (time.process_time() - cpu) / pairs
    segmenter = FrangiSegmenter()
    start, cpu = time.perf_counter(), time.process_time()
    warm = [[segmenter.segment(s.image, p) for p in CANDIDATE_PROMPTS] for s in samples]
    after, after_cpu = (time.perf_counter() - start) / pairs, (time.process_time() - cpu) / pairs
    identical = all(
        _same(a, b)
        for row_a, row_b in zip(fresh, warm, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    stats = segmenter.stats()
    print(f"(a) {len(samples)} images x {len(CANDIDATE_PROMPTS)} prompts = {pairs} pairs")
    print("    ms/pair (wall, CPU of all threads: CPU is steadier on a shared machine)")
    rows = [
        ("before-equivalent (fresh segmenter per pair)", before, before_cpu),
        ("after (all prompts of one image in a row)", after, after_cpu),
    ]
    for label, wall, cpu_s in rows:
        print(f"    {label:46s} {wall * 1e3:6.1f} {cpu_s * 1e3:6.1f}")
    print(
        f"    ratio before / after: {before / after:.2f}x wall, {before_cpu / after_cpu:.2f}x CPU; "
        f"results bit-identical: {identical}"
    )
    print(
        f"    per-scale responses computed {stats.responses_computed}, "
        f"reused {stats.responses_reused}"
    )


def bench_oracle(samples: list, n: int) -> None:
    groups: dict[str, list[str]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample.id)
    test_ids = spread(split_groups(groups).test, n)
    by_id = {s.id: s for s in samples}
    segmenter, ops = FrangiSegmenter(), MaskOpsConfig()
    starts = [
        (MaskState.from_segmentation(segmenter.segment(by_id[i].image, DEFAULT_PROMPT)), by_id[i])
        for i in test_ids
    ]
    exhaustive_s = tree_s = 0.0  # wall
    tree_applications, same = 0, True
    for state, sample in starts:
        t0 = time.perf_counter()
        mask, sequence = oracle_postprocess_mask(state, sample.mask, ops, DEPTH)
        t1 = time.perf_counter()
        found = best_ops_by_dice(state, sample.mask, ops, DEPTH)
        t2 = time.perf_counter()
        exhaustive_s, tree_s = exhaustive_s + t1 - t0, tree_s + t2 - t1
        tree_applications += found.applications
        same &= list(found.sequence) == sequence and np.array_equal(found.state.mask, mask)
    k = len([op for op in ops.ops if op != "stop"])
    exhaustive_applications = len(starts) * sum(k**d for d in range(1, DEPTH + 1))
    print(f"(b) oracle_postprocess, {len(starts)} test images, depth {DEPTH}, {k} ops")
    print(
        f"    exhaustive: {exhaustive_s / len(starts):6.2f} s/image, "
        f"{exhaustive_applications / len(starts):.0f} applications/image"
    )
    print(
        f"    tree:       {tree_s / len(starts):6.2f} s/image, "
        f"{tree_applications / len(starts):.0f} applications/image"
    )
    print(f"    speed-up {exhaustive_s / tree_s:.2f}x; same sequences and masks: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20, help="frames for (a), evenly spread")
    parser.add_argument("--oracle-images", type=int, default=8, help="test frames for (b)")
    args = parser.parse_args()
    samples = generate_samples(DEFAULT_FRAMES)
    bench_pairs([samples[i] for i in np.linspace(0, DEFAULT_FRAMES - 1, args.images).astype(int)])
    bench_oracle(samples, args.oracle_images)


if __name__ == "__main__":
    main()
