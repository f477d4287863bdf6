"""Benchmark: a real Sa2VA checkpoint on one GPU: load time, GPU memory, latency per call.

Run (from the repository root, on a CUDA machine with the weights)::

    python benchmarks/bench_sa2va.py --model /models/Sa2VA-4B --device cuda:0 --images 5
    python benchmarks/bench_sa2va.py --model /models/Sa2VA-4B --size 1024 --input-cap 512

It loads the folder as a run does (preflight, then ``Sa2VASegmenter``), segments ``--images``
synthetic angiograms of ``--size`` px (one warm-up call first, not counted) and prints:

- load time (s) and GPU memory allocated after loading (MiB): the *weights* of the GPU plan,
  which ``run`` reads from the folder (``checkpoint_footprint`` in
  ``orchestrator/gpu/footprints.py``);
- per call: latency (ms) and the peak GPU memory above the loaded model (MiB): the plan's
  *activation* figure (which also covers the CUDA context, which ``torch.cuda`` does not count:
  compare with ``nvidia-smi``);
- the plan's figures for this folder (``--model-size`` declared must agree) next to the
  measured ones: what a worker measures and reports in ``summary.json``'s ``gpu_memory``.

``--device cpu`` works only with a model whose code does not hard-code CUDA (the tests' tiny
fixture: ``python benchmarks/bench_sa2va.py --model <fixture folder> --device cpu``); it then
reports latency only.

One image, many prompts (``--compare``): the per-prompt path (``segment`` per prompt, image-only
work recomputed as upstream does) against the shared one (``segment_prompts``: the vision
encoder and SAM2's image encoder once per image), on ``--images`` images x ``--prompts`` of the
candidate prompts, interleaved image by image after a warm-up. It prints each path's runs of
every image-only sub-module per image (counted where the model calls them), its wall latency and
process CPU time per (image, prompt) pair (CPU time is the steadier figure on a loaded CPU
machine; on CUDA the wall time is the one that counts), the shared/per-prompt ratios, and
whether the answers are identical (mask, soft mask and score, bit for bit)::

    python benchmarks/bench_sa2va.py --model /models/Sa2VA-4B --compare --images 5
    python benchmarks/bench_sa2va.py --fixtures      # the tests' tiny v2 and Qwen folders, CPU

``--fixtures`` writes the tests' tiny fixtures (v2 InternVL-style, Qwen-VL-style) to a temporary
folder and compares on each on the CPU in float32: CPU-fixture figures, whose encoders are a few
small layers, so the latency ratio says little about a real checkpoint (the call counts do).
The v1 fixture needs transformers < 4.52 and is left out here (the tests cover it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from envs.synthetic import generate_samples
from models.errors import UserError
from models.prompts import CANDIDATE_PROMPTS, DEFAULT_PROMPT
from models.sa2va import Sa2VASegmenter, preflight
from models.sa2va.checkpoint_size import loaded_dtype, read_model_weights
from models.segmentation import Segmentation
from orchestrator.gpu.footprints import footprint_for

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Sa2VA model folder")
    parser.add_argument("--compare", action="store_true", help="per-prompt vs shared path")
    parser.add_argument("--fixtures", action="store_true", help="--compare on the tiny fixtures")
    parser.add_argument("--prompts", type=int, default=11, help="candidate prompts (--compare)")
    parser.add_argument("--device", default="auto", help="auto, cuda:N or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default), float32, ...")
    parser.add_argument("--images", type=int, default=5, help="timed calls (one image each)")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (px)")
    parser.add_argument("--input-cap", type=int, default=None, help="longest side fed in")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--model-size", default=None, choices=["1B", "4B", "8B", "26B"])
    args = parser.parse_args()
    if args.fixtures:
        return compare_on_fixtures(args)
    if args.model is None:
        parser.error("--model is required (or --fixtures)")
    try:
        checkpoint = preflight(args.model, device=args.device)
        dtype = args.dtype or loaded_dtype(args.device)
        weights = read_model_weights(args.model)
        plan = footprint_for("sa2va", args.model_size, checkpoint=weights, dtype=dtype)
        cuda = torch.cuda.is_available() and args.device != "cpu"
        start = time.perf_counter()
        seg = Sa2VASegmenter(
            args.model, device=args.device, dtype=args.dtype, input_cap=args.input_cap
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cuda:
        torch.cuda.synchronize(seg.device)
    load_s = time.perf_counter() - start
    loaded_mib = torch.cuda.memory_allocated(seg.device) / MIB if cuda else 0.0
    generation = checkpoint.generation.key if checkpoint is not None else "hub"
    print(f"model {args.model} ({generation}), device {seg.device}, dtype {seg.dtype}")
    print(f"load: {load_s:.1f} s; GPU memory allocated after load: {loaded_mib:,.0f} MiB")
    if args.compare:
        compare(seg, args)
        seg.close()
        return 0

    samples = generate_samples(args.images + 1, seed=0)
    images = [_resized(s.image, args.size) for s in samples]
    seg.segment(images[0], args.prompt)  # warm-up: lazy init, cuDNN autotune
    latencies, peaks, flags = [], [], []
    for image in images[1:]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(seg.device)
        start = time.perf_counter()
        result = seg.segment(image, args.prompt)
        if cuda:
            torch.cuda.synchronize(seg.device)
            peaks.append(torch.cuda.max_memory_allocated(seg.device) / MIB - loaded_mib)
        latencies.append((time.perf_counter() - start) * 1000)
        flags.append(",".join(result.flags) or "-")
    print(f"{'call':>4} {'latency ms':>11} {'peak above model MiB':>21}  flags")
    for i, latency in enumerate(latencies):
        peak = f"{peaks[i]:,.0f}" if peaks else "n/a"
        print(f"{i + 1:>4} {latency:>11.0f} {peak:>21}  {flags[i]}")
    print(
        f"latency median {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms "
        f"({args.size}x{args.size} px, input cap {args.input_cap})"
    )
    if peaks:
        print(
            f"footprint measured: weights {loaded_mib:,.0f} MiB + activation {max(peaks):,.0f} "
            f"MiB (+ CUDA context); planned ({plan.name}): weights {plan.weights_mb:,} MB + "
            f"activation {plan.activation_mb:,} MB (+ {plan.per_tile_mb} MB per tile beyond one)"
        )
    seg.close()
    return 0


def compare(seg: Sa2VASegmenter, args: argparse.Namespace) -> None:
    """Per-prompt vs shared path on the same loaded model (see the module docstring)."""
    prompts = list(CANDIDATE_PROMPTS[: args.prompts])
    samples = generate_samples(args.images + 1, seed=0)
    images = [_resized(s.image, args.size) for s in samples]
    cuda = seg.device.type == "cuda"
    runs = {"per-prompt": _PathRuns(), "shared": _PathRuns()}
    _per_prompt(seg, images[0], prompts)  # warm-up: lazy initialisation, allocator
    _shared(seg, images[0], prompts)
    for image in images[1:]:
        for name, run in (("per-prompt", _per_prompt), ("shared", _shared)):
            runs[name].add(seg, lambda run=run, image=image: run(seg, image, prompts), cuda)
    pairs = len(prompts) * (len(images) - 1)
    for name, path in runs.items():
        calls = ", ".join(f"{site} {n / (len(images) - 1):.1f}" for site, n in path.calls.items())
        print(
            f"  {name:<10} image-only runs per image: {calls}; per (image, prompt) pair "
            f"{path.seconds / pairs * 1000:.1f} ms wall, {path.cpu_seconds / pairs * 1000:.1f} "
            "ms process CPU"
        )
    ratio = runs["shared"].seconds / runs["per-prompt"].seconds
    cpu_ratio = runs["shared"].cpu_seconds / runs["per-prompt"].cpu_seconds
    same = all(map(_same, runs["shared"].results, runs["per-prompt"].results))
    print(
        f"  ratio shared/per-prompt: wall {ratio:.2f}, process CPU {cpu_ratio:.2f} "
        f"({len(images) - 1} images x "
        f"{len(prompts)} prompts, {args.size}x{args.size} px); answers identical: "
        f"{'yes' if same else 'NO'}"
    )


class _PathRuns:
    """Latency, image-only runs and answers of one path over the timed images."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls: dict[str, int] = {}
        self.results: list[Segmentation] = []

    def add(self, seg: Sa2VASegmenter, run: Callable[[], list[Segmentation]], cuda: bool) -> None:
        before = seg.image_work.counts()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.results += run()
        if cuda:
            torch.cuda.synchronize(seg.device)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        for site, count in seg.image_work.counts().items():
            ran = count["computed"] - before[site]["computed"]
            self.calls[site] = self.calls.get(site, 0) + ran


def _per_prompt(seg: Sa2VASegmenter, image: np.ndarray, prompts: list[str]) -> list[Segmentation]:
    seg.share_image_work = False
    return [seg.segment(image, prompt) for prompt in prompts]


def _shared(seg: Sa2VASegmenter, image: np.ndarray, prompts: list[str]) -> list[Segmentation]:
    seg.share_image_work = True
    return seg.segment_prompts(image, prompts)


def _same(a: Segmentation, b: Segmentation) -> bool:
    probs = (a.prob is None and b.prob is None) or (
        a.prob is not None and b.prob is not None and a.prob.tobytes() == b.prob.tobytes()
    )
    return (
        bool(np.array_equal(a.mask, b.mask)) and probs and (a.score, a.flags) == (b.score, b.flags)
    )


def compare_on_fixtures(args: argparse.Namespace) -> int:
    """``compare`` on the tests' tiny v2 and Qwen fixtures, CPU float32."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_sa2va import write_tiny_sa2va

    # The Qwen fixture asserts a processor but does its own preprocessing.
    processor = SimpleNamespace(tokenizer=object(), image_processor=object())
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("v2", "qwen"):
            path = write_tiny_sa2va(Path(folder) / f"tiny_sa2va_{variant}", variant=variant)
            seg = Sa2VASegmenter(
                path, device="cpu", processor=processor if variant == "qwen" else None
            )
            print(f"CPU fixture {variant} (float32):")
            compare(seg, args)
            seg.close()
    return 0


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


if __name__ == "__main__":
    sys.exit(main())
