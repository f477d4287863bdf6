"""The GPU memory budget: what fits where, decided before anything loads.

Ray counts GPUs, not GPU memory, and Ray 2.60 ships no GPU-memory resource. So the orchestrator
plans memory itself, from an inventory (per node and GPU: total and used memory, read with NVML
by :mod:`orchestrator.gpu.inventory` or declared as ``--inventory``) and a worker's footprint:
its weights read from the checkpoint folder (:func:`checkpoint_footprint`; the table's
``model_size`` only where the folder cannot be read) and the table's activation figures:

1. at most one segmentation worker per GPU, on every GPU where its weights, its activations at
   the smallest input cap and the safety margin fit in the free memory; its ``input_cap``
   (longest image side, the cap :class:`orchestrator.inference.worker.SegmentationWorker`
   halves on CUDA OOM) is the largest step of ``1024, 512, 256`` whose activations still fit;
2. per node, the GPU with the most memory left after that is the *trial GPU*: its left-over
   memory is published to Ray as the custom resource ``gpu_mem_mb``, which GPU-using Tune trials
   (reward-net training) request, so Tune queues them instead of letting them run out of memory.
   Only one GPU per node backs ``gpu_mem_mb``: a node-level Ray resource can not tell which GPU a
   trial got, so pooling two GPUs' left-overs could admit a trial that fits on neither.

Pinning workers to the planned GPUs. ``num_gpus=1`` lets Ray choose the device, and Ray only
chooses among the GPUs it was started with. Each node's Ray is therefore started with
``--num-gpus`` = the number of planned workers and ``CUDA_VISIBLE_DEVICES`` listing the planned
GPUs *first*, then the node's other GPUs. Ray hands its GPU slot ``i`` to an actor as the
``i``-th entry of ``CUDA_VISIBLE_DEVICES``, so ``num_gpus=1`` actors land exactly on the planned
GPUs, while processes without a Ray GPU (trials; Ray 2.60 no longer blanks their
``CUDA_VISIBLE_DEVICES``) still see every GPU and find the trial GPU through
``SA2VA_TRIAL_GPU`` (:func:`trial_cuda_device`). ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA
count devices like NVML does. A local run applies :meth:`NodePlan.env` to ``os.environ`` and
calls ``ray.init(**plan.ray_init_kwargs())``; an existing cluster restarts each node with
:meth:`NodePlan.ray_start_command` (``sa2va-rl plan --ray-start-args`` prints them).

Units: ``MB`` means MiB (2**20 bytes) and ``GB`` GiB, as ``nvidia-smi`` counts; all budget
arithmetic is in whole MB so that plans are exact. Pure Python: importing this module does not
import Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import UserError, option
from orchestrator.gpu.inventory import (
    INVENTORY_FORMAT,
    MB_PER_GB,
    GpuInfo,
    NodeInventory,
    gb_to_mb,
    mb_to_gb,
)

if TYPE_CHECKING:
    from models.sa2va.checkpoint_size import CheckpointWeights

GPU_MEM_RESOURCE = "gpu_mem_mb"
"""Ray custom resource: MB of GPU memory left for trials on the node's trial GPU."""
WORKER_SLOT_RESOURCE = "sa2va_worker_slot"
"""Ray custom resource: one per planned segmentation worker on the node."""
TRIAL_GPU_ENV = "SA2VA_TRIAL_GPU"
"""Environment variable naming (by NVML index) the GPU whose memory ``gpu_mem_mb`` counts."""
DEFAULT_MARGIN_GB = 1.0

INPUT_CAPS = (1024, 512, 256)
"""Worker input caps tried in order (longest image side, px): the worker's OOM back-off halves
the cap down to 256, so the plan uses the same steps."""
SA2VA_TILE_PX = 448
SA2VA_MAX_TILES = 12
"""Sa2VA's InternVL preprocessing: 448 px tiles, at most ``max_dynamic_patch`` = 12."""
SAM2_PARAMS_M = 224
"""SAM2 Hiera-L (224.4 M parameters), the mask decoder inside every Sa2VA."""
BF16_BYTES = 2

log = logging.getLogger(__name__)


class PlanError(UserError):
    """No GPU can hold a segmentation worker: says what was needed, what is free, what to do."""


@dataclass(frozen=True)
class Footprint:
    """GPU memory one user of a GPU needs.

    Attributes:
        name: table key (``sa2va-4b``) or ``custom (N GB)`` for ``--model-gb``.
        kind: ``segmenter`` (a worker backend, may get a GPU) or ``trial`` (a Tune trial that
            requests ``gpu_mem_mb``).
        weights_mb: memory that does not depend on the input (bf16 weights).
        activation_mb: working memory of one request at one 448 px tile, CUDA context included.
        per_tile_mb: extra working memory per additional tile.
        params_m: parameter count in millions, where the footprint comes from one.
        needs_gpu: False for CPU backends (Frangi).
    """

    name: str
    kind: str
    weights_mb: int
    activation_mb: int = 0
    per_tile_mb: int = 0
    params_m: int | None = None
    needs_gpu: bool = True

    def worker_mb(self, input_cap: int) -> int:
        """MB one worker holds when its longest input side is at most ``input_cap``."""
        extra_tiles = sa2va_tiles(input_cap) - 1 if self.per_tile_mb else 0
        return self.weights_mb + self.activation_mb + extra_tiles * self.per_tile_mb


def sa2va_tiles(input_cap: int) -> int:
    """Tiles Sa2VA cuts a square image of side ``input_cap`` into (the worst case for that
    longest side), thumbnail included: InternVL's ``dynamic_preprocess`` takes the largest
    n x n grid (n*n <= 12) whose tile area is under twice the image area."""
    n = 1
    while (n + 1) ** 2 <= SA2VA_MAX_TILES and input_cap**2 > 0.5 * (SA2VA_TILE_PX * (n + 1)) ** 2:
        n += 1
    return n * n + (1 if n > 1 else 0)


def _sa2va(size: str, vlm_params_m: int, activation_mb: int, per_tile_mb: int) -> Footprint:
    params_m = vlm_params_m + SAM2_PARAMS_M
    weights_mb = math.ceil(params_m * 1_000_000 * BF16_BYTES / 2**20)
    return Footprint(f"sa2va-{size}", "segmenter", weights_mb, activation_mb, per_tile_mb, params_m)


# Parameter counts: the InternVL2.5 base models (1B: 938 M, 4B: 3.71 B, 8B: 8.08 B, 26B: 25.5 B,
# from their model cards) plus SAM2; a run takes the weights from the checkpoint folder instead
# (checkpoint_footprint) and these only where the files cannot be read. Activation allowances
# are estimates: CUDA context (~0.5 GB), SAM2 at 1024 px and a short generation at one tile; per
# extra tile the KV cache of 256 visual tokens and the vision encoder's transient memory. Every
# GPU worker measures its own figures and reports them beside these (summary.json's
# gpu_memory, orchestrator/inference/gpu_memory.py; benchmarks/bench_sa2va.py on one GPU).
FOOTPRINTS: Mapping[str, Footprint] = {
    "frangi": Footprint("frangi", "segmenter", 0, needs_gpu=False),
    "sa2va-1b": _sa2va("1b", 938, activation_mb=1024, per_tile_mb=32),
    "sa2va-4b": _sa2va("4b", 3713, activation_mb=1536, per_tile_mb=64),
    "sa2va-8b": _sa2va("8b", 8075, activation_mb=2048, per_tile_mb=128),
    "sa2va-26b": _sa2va("26b", 25514, activation_mb=3072, per_tile_mb=256),
    # A small CNN on RGB+mask at 256 px (~50 MB with Adam state), batch 8, plus its own CUDA
    # context: the original ran it next to Sa2VA and had to cut the batch after an OOM.
    "reward-net-train": Footprint("reward-net-train", "trial", 512, activation_mb=512),
    # Sa2VA's head in float32 with Adam (text_hidden_fcs, ~14 M parameters for an 8B LLM's
    # hidden size, + SAM2's mask decoder, ~4 M: x4 for weights, gradients and two moments) and
    # its CUDA context; the activations of 8 images' decoder calls kept for the backward pass
    # (SAM2's two-way transformer on 64x64 tokens, the masks upsampled to 1024 px and the image).
    "sa2va-head-train": Footprint("sa2va-head-train", "trial", 768, activation_mb=1280),
}
SEGMENTER_MODELS = tuple(k for k, f in FOOTPRINTS.items() if f.kind == "segmenter")
REWARD_NET_TRAIN_MB = (
    FOOTPRINTS["reward-net-train"].weights_mb + FOOTPRINTS["reward-net-train"].activation_mb
)
SA2VA_HEAD_TRAIN_MB = (
    FOOTPRINTS["sa2va-head-train"].weights_mb + FOOTPRINTS["sa2va-head-train"].activation_mb
)


def custom_footprint(model_gb: float) -> Footprint:
    """``--model-gb``: ``model_gb`` is all one worker holds (weights and activations, e.g. as
    measured with nvidia-smi); the margin comes on top. No per-tile figure, so the input cap
    stays at its largest step."""
    if not model_gb > 0:
        raise UserError(f"{option('model_gb')} must be a positive number of GB, got {model_gb!r}")
    return Footprint(f"custom ({model_gb:g} GB)", "segmenter", gb_to_mb(model_gb))


def footprint_for(
    backend: str,
    model_size: str | None = None,
    model_gb: float | None = None,
    checkpoint: CheckpointWeights | None = None,
    dtype: str = "bfloat16",
) -> Footprint:
    """The worker footprint for a run config: ``backend`` ``frangi`` or ``sa2va``.

    For Sa2VA the weights come from the ``checkpoint`` folder when it could be read, loaded in
    ``dtype`` (:func:`checkpoint_footprint`); the table's ``model_size`` (``1B``/``4B``/``8B``/
    ``26B``, default 4B) only when it could not. ``model_gb`` replaces the figures (all a worker
    holds), but never below the checkpoint's own weights."""
    if checkpoint is not None and backend != "frangi":
        return checkpoint_footprint(checkpoint, dtype, model_size, model_gb)
    if model_gb is not None:
        return custom_footprint(model_gb)
    key = "frangi" if backend == "frangi" else f"{backend}-{(model_size or '4B').lower()}"
    if key not in FOOTPRINTS or FOOTPRINTS[key].kind != "segmenter":
        raise UserError(
            f"no GPU footprint for backend {backend!r} size {model_size!r}; "
            f"known: {', '.join(SEGMENTER_MODELS)}"
        )
    return FOOTPRINTS[key]


def nearest_size(params_m: float) -> str:
    """The Sa2VA size (``1B``/``4B``/``8B``/``26B``) whose parameter count is nearest to
    ``params_m`` million (by ratio)."""
    sized = {n: f.params_m for n, f in FOOTPRINTS.items() if n.startswith("sa2va-") and f.params_m}
    name = min(sized, key=lambda n: abs(math.log(max(params_m, 1e-3) / sized[n])))
    return name.removeprefix("sa2va-").upper()


def checkpoint_footprint(
    checkpoint: CheckpointWeights,
    dtype: str,
    model_size: str | None = None,
    model_gb: float | None = None,
) -> Footprint:
    """A worker of the checkpoint read from its folder: its parameters in ``dtype`` as the
    weights, and the activation figures of the Sa2VA size nearest to its parameter count.

    Raises:
        UserError: ``model_size`` declared but the folder is nearest another size (planned at
            the declared size the workers could run out of memory, or waste GPUs), or
            ``model_gb`` below the checkpoint's weights.
    """
    size = nearest_size(checkpoint.parameters / 1e6)
    weights_mb = math.ceil(checkpoint.loaded_bytes(dtype) / 2**20)
    where = f"the model folder {checkpoint.folder} holds {checkpoint.describe()}"
    if model_size is not None and model_size.upper() != size:
        raise UserError(
            f"{option('model')} says {model_size}, but {where}: the size of Sa2VA-{size}, "
            f"{weights_mb} MB of weights in {dtype}. The GPU plan reads the folder: drop the "
            f"declared size, or set it to {size}."
        )
    if model_gb is not None and gb_to_mb(model_gb) < weights_mb:
        raise UserError(
            f"{option('model_gb')} is {model_gb:g} GB, but {where}, {weights_mb} MB of weights in "
            f"{dtype} alone. Measure a worker again (weights and activations) or drop it."
        )
    if model_gb is not None:
        return custom_footprint(model_gb)
    table = FOOTPRINTS[f"sa2va-{size.lower()}"]
    count = checkpoint.parameters
    size_text = f"{count / 1e9:.2f}B" if count >= 10**8 else f"{count:,} parameters"
    name = f"sa2va {size_text} ({Path(checkpoint.folder).name}, {dtype})"
    params_m = round(checkpoint.parameters / 1e6)
    return Footprint(
        name, "segmenter", weights_mb, table.activation_mb, table.per_tile_mb, params_m
    )


@dataclass(frozen=True)
class GpuSlot:
    """One GPU in the plan.

    Attributes:
        worker_mb: MB planned for the segmentation worker on it (0: no worker).
        input_cap: the worker's longest-side input cap in px (None: no worker).
        left_mb: free memory minus margin minus worker, what trials may still use.
        note: why there is no worker, when there is none.
    """

    node: str
    gpu: int
    total_mb: int
    used_mb: int
    worker_mb: int
    input_cap: int | None
    left_mb: int
    note: str = ""

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)

    @property
    def has_worker(self) -> bool:
        return self.input_cap is not None


@dataclass(frozen=True)
class NodePlan:
    """One node's share of the plan and the Ray settings that enforce it (``note``: the
    inventory's reason when the node has no GPU)."""

    node: str
    gpus: tuple[GpuSlot, ...]
    trial_gpu: int | None
    note: str = ""

    @property
    def worker_gpus(self) -> tuple[int, ...]:
        return tuple(g.gpu for g in self.gpus if g.has_worker)

    @property
    def gpu_mem_mb(self) -> int:
        """MB published as ``gpu_mem_mb``: what is left on the trial GPU."""
        return next((g.left_mb for g in self.gpus if g.gpu == self.trial_gpu), 0)

    @property
    def cuda_visible_devices(self) -> str:
        """Worker GPUs first (Ray's GPU slots map onto them), then the node's other GPUs."""
        rest = [g.gpu for g in self.gpus if not g.has_worker]
        return ",".join(str(i) for i in (*self.worker_gpus, *rest))

    def env(self) -> dict[str, str]:
        """Environment for this node's Ray processes (empty on a node without GPUs)."""
        if not self.gpus:
            return {}
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices}
        if self.trial_gpu is not None:
            env[TRIAL_GPU_ENV] = str(self.trial_gpu)
        return env

    def ray_resources(self) -> dict[str, float]:
        """Custom resources of this node (zero amounts left out, as Ray drops them)."""
        amounts = {GPU_MEM_RESOURCE: self.gpu_mem_mb, WORKER_SLOT_RESOURCE: len(self.worker_gpus)}
        return {name: float(value) for name, value in amounts.items() if value > 0}

    def ray_node_args(self) -> dict[str, Any]:
        """Keyword arguments for ``ray.cluster_utils.Cluster.add_node`` (num_cpus not set)."""
        return {
            "num_gpus": len(self.worker_gpus),
            "resources": self.ray_resources(),
            "env_vars": self.env(),
        }

    def ray_start_command(self) -> str:
        """``ray start`` for this node; the caller adds ``--head`` or ``--address=HEAD:PORT``."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        resources = json.dumps({k: int(v) for k, v in self.ray_resources().items()})
        args = f"ray start --num-gpus={len(self.worker_gpus)} --resources={shlex.quote(resources)}"
        return f"{env} {args}".strip()


@dataclass(frozen=True)
class GpuPlan:
    """Where segmentation workers go, their input caps and what is left for trials.

    Build it with :func:`build_plan`; call :meth:`require_workers` before starting anything.
    """

    footprint: Footprint
    margin_mb: int
    nodes: tuple[NodePlan, ...]

    @property
    def workers(self) -> tuple[GpuSlot, ...]:
        return tuple(g for node in self.nodes for g in node.gpus if g.has_worker)

    @property
    def all_gpus(self) -> tuple[GpuSlot, ...]:
        return tuple(g for node in self.nodes for g in node.gpus)

    @property
    def has_gpus(self) -> bool:
        return bool(self.all_gpus)

    @property
    def feasible(self) -> bool:
        """True when the backend needs no GPU or at least one worker fits."""
        return not self.footprint.needs_gpu or bool(self.workers)

    def require_workers(self) -> None:
        """Raise :class:`PlanError` (what was needed, the best GPU, what to do) unless feasible."""
        if not self.feasible:
            raise PlanError(self._infeasible_message())

    def require_trial_memory(self, mb: int, what: str = "a GPU trial") -> None:
        """Raise :class:`PlanError` unless some node publishes ``gpu_mem_mb`` >= ``mb``;
        otherwise such a trial would wait in Tune's queue forever."""
        best = max((node.gpu_mem_mb for node in self.nodes), default=0)
        if mb > best:
            raise PlanError(
                f"{what} needs {mb} MB of GPU memory, but the most any node has left for trials "
                f"is {best} MB. Use a smaller segmentation model, free memory on a GPU, lower "
                f"{option('margin_gb')} (now {mb_to_gb(self.margin_mb):g}), or run {what} on the "
                "CPU."
            )

    @property
    def local_node(self) -> NodePlan:
        """The only node of a single-node plan (a local run)."""
        if len(self.nodes) != 1:
            raise ValueError(
                f"the plan has {len(self.nodes)} nodes; start each with its ray_start_command()"
            )
        return self.nodes[0]

    def ray_init_kwargs(self) -> dict[str, Any]:
        """``ray.init`` arguments for a local run. Apply ``plan.local_node.env()`` to
        ``os.environ`` first: Ray's processes inherit it and the GPU pinning depends on it."""
        node = self.local_node
        return {"num_gpus": len(node.worker_gpus), "resources": node.ray_resources()}

    def to_json(self) -> dict[str, Any]:
        """The plan as plain data (MB integers), for ``--json`` and the run directory."""
        return {
            "model": self.footprint.name,
            "margin_mb": self.margin_mb,
            "feasible": self.feasible,
            "workers": len(self.workers),
            "nodes": [_node_json(node) for node in self.nodes],
        }

    def _infeasible_message(self) -> str:
        fp, margin = self.footprint, self.margin_mb
        need = fp.worker_mb(INPUT_CAPS[-1]) + margin
        head = (
            f"{fp.name} needs one GPU with {need} MB free ({need - margin} MB for the model "
            f"at its smallest input cap + {margin} MB safety margin)"
        )
        if not self.has_gpus:
            notes = "; ".join(f"{n.node}: {n.note}" for n in self.nodes if n.note)
            why = f" ({notes})" if notes else ""
            return (
                f"no GPU found{why}. {head}. Use {option('cpu_backend')} (CPU, needs no GPU), "
                f"run on a machine with a GPU, or declare GPUs to plan for: {INVENTORY_FORMAT}."
            )
        best = max(self.all_gpus, key=lambda g: g.free_mb)
        fits = [
            name
            for name in SEGMENTER_MODELS
            if FOOTPRINTS[name].needs_gpu
            and FOOTPRINTS[name].worker_mb(INPUT_CAPS[-1]) + margin <= best.free_mb
        ]
        smaller = f"{' or '.join(fits)} would fit" if fits else "no Sa2VA size fits"
        room = best.free_mb - fp.worker_mb(INPUT_CAPS[-1])
        margin_now = f"{option('margin_gb')}, now {mb_to_gb(margin):g} GB"
        margin_hint = (
            f"lower the safety margin to at most {math.floor(room * 100 / MB_PER_GB) / 100:.2f} "
            f"GB ({margin_now})"
            if room >= 0
            else f"lowering the safety margin alone is not enough ({margin_now})"
        )
        return (
            f"{head}, but the GPU with the most free memory, {best.node} GPU {best.gpu}, has "
            f"{best.free_mb} MB free ({best.total_mb} total, {best.used_mb} used). Do one of: "
            f"use a smaller model with {option('model')} ({smaller}) or the CPU backend "
            f"({option('cpu_backend')}); "
            f"free {need - best.free_mb} MB more on a GPU (stop other processes on it); "
            f"{margin_hint}."
        )


def _node_json(node: NodePlan) -> dict[str, Any]:
    return {
        "node": node.node,
        "worker_gpus": list(node.worker_gpus),
        "trial_gpu": node.trial_gpu,
        "gpu_mem_mb": node.gpu_mem_mb,
        "env": node.env(),
        "num_gpus": len(node.worker_gpus),
        "resources": {k: int(v) for k, v in node.ray_resources().items()},
        "gpus": [
            {
                "gpu": g.gpu,
                "total_mb": g.total_mb,
                "used_mb": g.used_mb,
                "free_mb": g.free_mb,
                "worker_mb": g.worker_mb,
                "input_cap": g.input_cap,
                "left_mb": g.left_mb,
                "note": g.note,
            }
            for g in node.gpus
        ],
    }


def build_plan(
    inventory: tuple[NodeInventory, ...], footprint: Footprint, margin_mb: int
) -> GpuPlan:
    """Place at most one worker of ``footprint`` on every GPU where it fits with ``margin_mb``
    to spare, and pick each node's trial GPU. Never raises for lack of memory: check
    :attr:`GpuPlan.feasible` or call :meth:`GpuPlan.require_workers`."""
    if margin_mb < 0:
        raise UserError(f"the safety margin must be >= 0 GB, got {mb_to_gb(margin_mb):g}")
    nodes = []
    for node in inventory:
        slots = tuple(_plan_gpu(node.node, g, footprint, margin_mb) for g in node.gpus)
        trial = max(slots, key=lambda s: (s.left_mb, -s.gpu), default=None)
        trial_gpu = trial.gpu if trial is not None and trial.left_mb > 0 else None
        nodes.append(NodePlan(node.node, slots, trial_gpu, node.note))
    return GpuPlan(footprint, margin_mb, tuple(nodes))


def _plan_gpu(node: str, gpu: GpuInfo, footprint: Footprint, margin_mb: int) -> GpuSlot:
    room = gpu.free_mb - margin_mb
    if not footprint.needs_gpu:
        return GpuSlot(node, gpu.gpu, gpu.total_mb, gpu.used_mb, 0, None, max(0, room))
    cap = next((c for c in INPUT_CAPS if footprint.worker_mb(c) <= room), None)
    if cap is None:
        need = footprint.worker_mb(INPUT_CAPS[-1]) + margin_mb
        note = f"needs {need} MB free, has {gpu.free_mb}"
        return GpuSlot(node, gpu.gpu, gpu.total_mb, gpu.used_mb, 0, None, max(0, room), note)
    worker_mb = footprint.worker_mb(cap)
    return GpuSlot(node, gpu.gpu, gpu.total_mb, gpu.used_mb, worker_mb, cap, room - worker_mb)


def pinned_gpu(device: str) -> int | None:
    """N of ``backend.device: cuda:N``, else None (``auto``, ``cuda``, ``cpu``)."""
    prefix, _, index = device.partition(":")
    return int(index) if prefix == "cuda" and index.isdigit() else None


def refuse_pinned_gpu_on_cluster(device: str) -> None:
    """Raise :class:`UserError` for ``cuda:N`` in a run on a cluster: N names a GPU of one
    machine, and there the plan places the workers."""
    if pinned_gpu(device) is not None:
        raise UserError(
            f"backend.device {device!r} names one GPU of one machine, but this run plans the "
            "GPUs of a cluster (--address, or several nodes in gpu.inventory), where a worker "
            "goes on every GPU that fits. Use backend.device: auto (or cuda); to keep a GPU out "
            "of the run, leave it out of CUDA_VISIBLE_DEVICES on its node."
        )


def restrict_to_device(
    inventory: tuple[NodeInventory, ...], device: str
) -> tuple[NodeInventory, ...]:
    """What ``backend.device`` leaves of a one-node inventory for ``run``: every GPU, or for
    ``cuda:N`` only the N-th GPU it lists (nvidia-smi's order among those
    ``CUDA_VISIBLE_DEVICES`` shows), so that N means the same GPU in the driver and in the
    worker, which sees only its own GPU (as ``cuda``: :func:`worker_device`).

    Raises:
        UserError: ``cuda:N`` with several nodes, or N beyond the node's GPUs.
    """
    index = pinned_gpu(device)
    if index is None:
        return inventory
    if len(inventory) != 1:
        refuse_pinned_gpu_on_cluster(device)
    (node,) = inventory
    if not node.gpus:
        return inventory  # the plan says that no GPU was found
    if index >= len(node.gpus):
        raise UserError(
            f"backend.device {device!r}: {node.node} has {len(node.gpus)} GPU(s) (cuda:0.."
            f"cuda:{len(node.gpus) - 1} in nvidia-smi's order among those CUDA_VISIBLE_DEVICES "
            "shows). Name one of them, or use auto to plan a worker on every GPU that fits."
        )
    return (NodeInventory(node.node, (node.gpus[index],), node.note),)


def worker_device(device: str) -> str:
    """``backend.device`` as a worker on a planned GPU gives it to Sa2VA: Ray shows the worker
    only its own GPU, so the plan's ``cuda:N`` is ``cuda`` there."""
    return "cuda" if pinned_gpu(device) is not None else device


def worker_actor_options() -> dict[str, Any]:
    """Ray options for a segmentation worker actor on a planned GPU: a whole Ray GPU (so Ray
    sets its ``CUDA_VISIBLE_DEVICES`` to one planned GPU), one worker slot, no CPU held."""
    return {"num_gpus": 1, "num_cpus": 0, "resources": {WORKER_SLOT_RESOURCE: 1}}


def trial_resources(gpu_mem_mb: int, cpus: float = 1.0) -> dict[str, float]:
    """A Tune resource request (``tune.with_resources``) for a trial using ``gpu_mem_mb`` MB of
    the trial GPU; Tune keeps the trial PENDING until that much is unclaimed on one node."""
    return {"cpu": cpus, GPU_MEM_RESOURCE: float(gpu_mem_mb)}


def trial_torch_device(gpu_mem_mb: int, environ: Mapping[str, str] = os.environ) -> str:
    """Where a GPU-using trial trains: its node's trial GPU (:func:`trial_cuda_device`) when it
    reserved ``gpu_mem_mb`` and this process has CUDA, else ``"cpu"`` (no reservation, no trial
    GPU on the node, or GPUs Ray was told of that torch cannot use, e.g. a test cluster's fake
    ones: logged, not an error)."""
    if not gpu_mem_mb:
        return "cpu"
    device = trial_cuda_device(environ)
    if device is None:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        log.warning(
            "the plan gave this trial %s, but torch sees no CUDA: training on the CPU", device
        )
        return "cpu"
    return device


def trial_cuda_device(environ: Mapping[str, str] = os.environ) -> str | None:
    """The torch device of this node's trial GPU (``cuda:K``) inside a trial that requested
    ``gpu_mem_mb``, or None when the node has no trial GPU (train on the CPU then)."""
    trial_gpu = environ.get(TRIAL_GPU_ENV)
    if trial_gpu is None:
        return None
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if trial_gpu not in visible:
        raise RuntimeError(
            f"{TRIAL_GPU_ENV}={trial_gpu} is not in CUDA_VISIBLE_DEVICES={visible}: "
            "this process was not started with the plan's environment"
        )
    return f"cuda:{visible.index(trial_gpu)}"
