"""The GPU memory budget: what fits where, decided before anything loads.

Ray counts GPUs, not GPU memory, and Ray 2.60 ships no GPU-memory resource. So the orchestrator
plans memory itself, from an inventory (per node and GPU: total and used memory, read with NVML
by :mod:`orchestrator.gpu.inventory` or declared as ``--inventory``) and a worker's footprint:
its weights read from the checkpoint folder
(:func:`~orchestrator.gpu.footprints.checkpoint_footprint`; the table's ``model_size`` only
where the folder cannot be read) and the table's activation figures:

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
``SA2VA_TRIAL_GPU`` (:func:`orchestrator.gpu.devices.trial_cuda_device`).
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA
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
import shlex
from dataclasses import dataclass
from typing import Any

from models.errors import UserError, option
from orchestrator.gpu.footprints import FOOTPRINTS, INPUT_CAPS, SEGMENTER_MODELS, Footprint
from orchestrator.gpu.inventory import (
    INVENTORY_FORMAT,
    MB_PER_GB,
    GpuInfo,
    NodeInventory,
    mb_to_gb,
)

GPU_MEM_RESOURCE = "gpu_mem_mb"
"""Ray custom resource: MB of GPU memory left for trials on the node's trial GPU."""
WORKER_SLOT_RESOURCE = "sa2va_worker_slot"
"""Ray custom resource: one per planned segmentation worker on the node."""
TRIAL_GPU_ENV = "SA2VA_TRIAL_GPU"
"""Environment variable naming (by NVML index) the GPU whose memory ``gpu_mem_mb`` counts."""
DEFAULT_MARGIN_GB = 1.0


log = logging.getLogger(__name__)


class PlanError(UserError):
    """No GPU can hold a segmentation worker: says what was needed, what is free, what to do."""


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
