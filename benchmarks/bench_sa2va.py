"""Benchmark: a real Sa2VA checkpoint on one GPU: load time, GPU memory, latency per call.

Run (from the repository root, on a CUDA machine with the weights)::

    python benchmarks/bench_sa2va.py --model /models/Sa2VA-4B --device cuda:0 --images 5
    python benchmarks/bench_sa2va.py --model /models/Sa2VA-4B --size 1024 --input-cap 512

It loads the folder as a run does (preflight, then ``Sa2VASegmenter``), segments ``--images``
synthetic angiograms of ``--size`` px (one warm-up call first, not counted) and prints:

- load time (s) and GPU memory allocated after loading (MiB): the *weights* of the GPU plan,
  which ``run`` reads from the folder (``orchestrator/gpu/budget.py``, ``checkpoint_footprint``);
- per call: latency (ms) and the peak GPU memory above the loaded model (MiB): the plan's
  *activation* figure (which also covers the CUDA context, which ``torch.cuda`` does not count:
  compare with ``nvidia-smi``);
- the plan's figures for this folder (``--model-size`` declared must agree) next to the
  measured ones: what a worker measures and reports in ``summary.json``'s ``gpu_memory``.

``--device cpu`` works only with a model whose code does not hard-code CUDA (the tests' tiny
fixture: ``python benchmarks/bench_sa2va.py --model <fixture folder> --device cpu``); it then
reports latency only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from envs.synthetic import generate_samples
from models.errors import UserError
from models.prompts import DEFAULT_PROMPT
from models.sa2va import Sa2VASegmenter, preflight
from models.sa2va.checkpoint_size import loaded_dtype, read_model_weights
from orchestrator.gpu.budget import footprint_for

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Sa2VA model folder")
    parser.add_argument("--device", default="auto", help="auto, cuda:N or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default), float32, ...")
    parser.add_argument("--images", type=int, default=5, help="timed calls (one image each)")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (px)")
    parser.add_argument("--input-cap", type=int, default=None, help="longest side fed in")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--model-size", default=None, choices=["1B", "4B", "8B", "26B"])
    args = parser.parse_args()
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


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


if __name__ == "__main__":
    sys.exit(main())
