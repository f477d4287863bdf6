"""Which device a process of a run computes on: the backend's ``device`` setting against the
plan (a worker sees only its own GPU), the Ray options of a worker actor, and the trial GPU a
GPU-using Tune trial trains on (or the CPU). See :mod:`orchestrator.gpu.budget` for how the plan
pins workers and publishes the trial GPU (``SA2VA_TRIAL_GPU``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from models.errors import UserError
from orchestrator.gpu.budget import GPU_MEM_RESOURCE, TRIAL_GPU_ENV, WORKER_SLOT_RESOURCE
from orchestrator.gpu.inventory import NodeInventory

log = logging.getLogger(__name__)


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
