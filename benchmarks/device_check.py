"""The checks that need a real CUDA GPU, in one script (no Ray, no weights to download).

Run on a CUDA machine from the repository root (the tests' tiny Sa2VA fixtures are written to
a temporary folder)::

    python benchmarks/device_check.py            # all checks, figures printed as it goes
    python benchmarks/device_check.py --json out.json

What it checks and prints:

1. **NVML inventory**: what ``orchestrator.gpu.inventory`` reads on this node, and the plan a
   4B checkpoint would get on it.
2. **Memory against the plan**: a segmentation worker on the fixture with a planned share,
   capped with ``set_per_process_memory_fraction``; what it measured after loading and per
   call, beside the plan (run first, on a fresh CUDA context).
3. **A real CUDA OOM through the back-off**: a worker whose backend allocates CUDA memory in
   proportion to its input cap, capped at a share it exceeds at 1024 px: the OOM is
   ``torch.OutOfMemoryError`` from the allocator, the worker halves the cap and answers.
4. **Fixtures in bfloat16 on CUDA** (v2 and Qwen layouts): masks against float32 on the CPU
   (share of pixels that differ), the shared path's masks against the per-prompt path's, and
   the latency of both.
5. **Sa2VA's head on CUDA in bfloat16**: the share of pixels where the float32 head at
   initialisation disagrees with the model's own mask (must be at most 1%), three Adam steps on
   the GPU, the export loaded with upstream's ``AutoModel`` on CUDA, and its masks against the
   head's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.prompts import CANDIDATE_PROMPTS  # noqa: E402
from models.segmentation import Segmentation  # noqa: E402

FIGURES: dict[str, Any] = {}


def check(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], None]]:
    """Run the check, print and keep its figures; a failure is printed and the next runs."""

    def wrap(body: Callable[[], dict[str, Any]]) -> Callable[[], None]:
        def run() -> None:
            print(f"\n== {name}", flush=True)
            start = time.perf_counter()
            try:
                figures = body()
                figures["ok"] = True
            except Exception as err:  # a check that fails must not hide the others' figures
                traceback.print_exc()
                figures = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            figures["seconds"] = round(time.perf_counter() - start, 2)
            FIGURES[name] = figures
            for key, value in figures.items():
                print(f"  {key}: {value}", flush=True)

        return run

    return wrap


def angiogram(size: int = 512, seed: int = 0) -> np.ndarray:
    from envs.synthetic import generate_samples

    image = generate_samples(1, seed=seed)[0].image
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def fixture(variant: str) -> Path:
    from tiny_sa2va import write_tiny_sa2va

    return write_tiny_sa2va(Path(tempfile.mkdtemp()) / f"tiny_sa2va_{variant}", variant=variant)


@check("1. NVML inventory and the plan of a 4B checkpoint")
def inventory() -> dict[str, Any]:
    from orchestrator.gpu import budget as gb
    from orchestrator.gpu import footprints
    from orchestrator.gpu import inventory as gi

    node = gi.read_local_node()
    plan = gb.build_plan((node,), footprints.FOOTPRINTS["sa2va-4b"], 1024)
    slots = [(s.gpu, s.worker_mb, s.input_cap, s.left_mb) for n in plan.nodes for s in n.gpus]
    return {
        "plan (gpu, worker_mb, input_cap, left_mb)": slots,
        "gpus": [(g.gpu, g.name, g.total_mb, g.used_mb) for g in node.gpus],
        "note": node.note,
        "workers_planned": len(plan.workers),
        "input_caps": [slot.input_cap for slot in plan.workers],
        "torch_cuda": torch.cuda.get_device_name(0),
    }


@check("4. tiny fixtures in bfloat16 on CUDA: masks vs float32 CPU, shared vs per-prompt")
def fixtures_bf16() -> dict[str, Any]:
    from models.sa2va import Sa2VASegmenter

    prompts = list(CANDIDATE_PROMPTS)
    images = [angiogram(512, seed) for seed in range(4)]
    out: dict[str, Any] = {}
    for variant in ("v2", "qwen"):
        folder = fixture(variant)
        # The Qwen layout asserts a processor; the tiny model only checks that one is passed.
        extra = {"processor": SimpleNamespace(tokenizer=object(), image_processor=object())}
        options = extra if variant == "qwen" else {}
        cpu = Sa2VASegmenter(folder, device="cpu", **options)
        gpu = Sa2VASegmenter(folder, device="cuda", **options)
        out[f"{variant}_dtype"] = str(next(gpu.model.parameters()).dtype)
        gpu.segment_prompts(images[0], prompts)  # warm-up
        torch.cuda.synchronize()
        differ, total = 0, 0
        per_prompt_s, shared_s = [], []
        for image in images:
            reference = [cpu.segment(image, p).mask for p in prompts]
            start = time.perf_counter()
            each = [gpu.segment(image, p) for p in prompts]
            torch.cuda.synchronize()
            per_prompt_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            shared = gpu.segment_prompts(image, prompts)
            torch.cuda.synchronize()
            shared_s.append(time.perf_counter() - start)
            for ref, one, both in zip(reference, each, shared, strict=True):
                differ += int(np.count_nonzero(ref != one.mask))
                total += ref.size
                assert np.array_equal(one.mask, both.mask), "shared path differs on CUDA"
        pairs = len(images) * len(prompts)
        out[f"{variant}_bf16_vs_fp32_pixels_differing"] = f"{differ / total:.5%}"
        out[f"{variant}_per_prompt_ms_per_pair"] = round(1000 * sum(per_prompt_s) / pairs, 2)
        out[f"{variant}_shared_ms_per_pair"] = round(1000 * sum(shared_s) / pairs, 2)
        out[f"{variant}_shared_over_per_prompt"] = round(sum(shared_s) / sum(per_prompt_s), 3)
    return out


@check("2. a segmentation worker's GPU memory against its planned share")
def memory_vs_plan() -> dict[str, Any]:
    from models.sa2va.checkpoint_size import read_weights
    from orchestrator.gpu import footprints
    from orchestrator.inference.backend_spec import BackendSpec
    from orchestrator.inference.gpu_memory import MemoryShare
    from orchestrator.inference.worker import SegmentationWorker

    folder = fixture("v2")
    weights = read_weights(folder)
    assert weights is not None
    footprint = footprints.checkpoint_footprint(weights, "bfloat16")
    share = MemoryShare(footprint.weights_mb, footprint.worker_mb(1024))
    spec = BackendSpec("sa2va", {"model_path": str(folder), "device": "cuda"})
    worker = SegmentationWorker("gpu-check-0", spec, None, input_cap=1024, memory_share=share)
    for seed in range(3):
        worker.segment_prompts(angiogram(1024, seed), list(CANDIDATE_PROMPTS[:4]))
    report = worker.stats()["gpu_memory"]
    return {"footprint": footprint.name, **report}


class CudaHungry:
    """A backend whose one call allocates ``bytes_per_px`` x cap^2 bytes of CUDA memory."""

    backend_id_base = "cuda-hungry"

    def __init__(self, bytes_per_px: int) -> None:
        self.bytes_per_px = bytes_per_px
        self.input_cap: int | None = None
        self.calls: list[tuple[int, str]] = []

    @property
    def backend_id(self) -> str:
        return f"{self.backend_id_base}:cap-{self.input_cap}"

    def set_input_cap(self, cap: int) -> None:
        self.input_cap = int(cap)

    def segment(self, image: np.ndarray, prompt: str) -> Segmentation:
        side = min(max(image.shape[:2]), self.input_cap or 10**9)
        try:
            block = torch.empty(side * side * self.bytes_per_px, dtype=torch.uint8, device="cuda")
            block.fill_(1)
            del block
        except torch.OutOfMemoryError:
            self.calls.append((side, "OutOfMemoryError"))
            raise
        self.calls.append((side, "ok"))
        mask = image[..., 0] < 128
        return Segmentation(mask, mask.astype(np.float32), None)


@check("3. a real CUDA OOM through the worker's back-off")
def real_oom() -> dict[str, Any]:
    from orchestrator.inference.gpu_memory import MemoryShare
    from orchestrator.inference.worker import SegmentationWorker

    backend = CudaHungry(bytes_per_px=2000)  # 2.0 GiB at 1024 px, 0.5 GiB at 512 px
    share = MemoryShare(weights_mb=0, worker_mb=1536)
    worker = SegmentationWorker(
        "oom-check", lambda: backend, None, input_cap=1024, memory_share=share
    )
    seg = worker.segment(angiogram(1024), "Please segment the blood vessel.")
    stats = worker.stats()
    return {
        "memory_fraction": stats["gpu_memory"]["memory_fraction"],
        "calls (side, outcome)": backend.calls,
        "oom_retries": stats["oom_retries"],
        "oom_failures": stats["oom_failures"],
        "input_cap_after": stats.get("input_cap"),
        "answer_flags": list(seg.flags),
    }


@check("5. Sa2VA's head on CUDA in bfloat16: exact start, GPU steps, export via AutoModel")
def head_on_cuda() -> dict[str, Any]:
    from transformers import AutoModel

    from models.sa2va import Sa2VASegmenter
    from models.sa2va.head import Sa2VAHeadBackend

    folder = fixture("v2")
    backend = Sa2VAHeadBackend(Sa2VASegmenter(folder, device="cuda"))
    prompt = "Please segment the blood vessel."
    images = [angiogram(512, seed) for seed in range(4)]
    inputs = [backend.frozen_inputs(image, [prompt])[0] for image in images]
    disagreement = [float(x.meta["mask_disagreement"]) for x in inputs]
    head = backend.initial_head().to("cuda").train()
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(3):
        loss = -torch.stack([torch.sigmoid(head(x)).mean() for x in inputs]).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.cuda.synchronize()
    step_ms = 1000 * (time.perf_counter() - start) / 3
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    head.to("cpu").eval()
    out = backend.export(head, Path(tempfile.mkdtemp()) / "tuned", {"steps": 3})
    model = AutoModel.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    dtype = str(next(model.parameters()).dtype)
    tuned = Sa2VASegmenter(out, device="cuda")
    differ = 0
    for image, x in zip(images, inputs, strict=True):
        with torch.no_grad():
            expected = torch.sigmoid(head(x)).numpy() > 0.5
        differ += int(np.count_nonzero(tuned.segment(image, prompt).mask != expected))
    pixels = sum(image.shape[0] * image.shape[1] for image in images)
    return {
        "initial_mask_disagreement_max": f"{max(disagreement):.5%}",
        "train_step_ms_4_images": round(step_ms, 1),
        "train_peak_mb_above_held": round(peak_mb, 1),
        "export_loads_with_automodel_dtype": dtype,
        "export_masks_vs_head_pixels_differing": f"{differ / pixels:.5%}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need one", file=sys.stderr)
        return 2
    for run in (inventory, memory_vs_plan, real_oom, fixtures_bf16, head_on_cuda):
        run()
    if args.json:
        Path(args.json).write_text(json.dumps(FIGURES, indent=2, default=str))
    failed = [name for name, figures in FIGURES.items() if not figures["ok"]]
    print(f"\n{len(FIGURES) - len(failed)} of {len(FIGURES)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
