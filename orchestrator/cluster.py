"""Stage 3 of a run: the GPU plan, Ray, and the run's segmentation workers.

- :func:`backend_spec` / :func:`check_model_source`: the backend a run's workers load, checked
  in the driver before anything starts (a Sa2VA folder's code and device);
- :func:`gpu_plan` / :func:`worker_footprint`: the memory plan of a GPU backend (None for the
  CPU backend), from the checkpoint folder and the inventory (NVML, declared, or the cluster's);
- :func:`start_ray`: join ``--address`` or start a local Ray with the plan's resources;
- :func:`check_shared_storage`: on a cluster, every node must see the run's folders;
- :func:`start_segmentation_workers`: one named worker per planned GPU (or CPU workers), named by
  the run id, with the pool's one input cap and each worker's planned memory share;
- :func:`gpu_memory_lines`: what the workers measured against the plan, for the driver's log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import UserError
from orchestrator.config import RunConfig
from orchestrator.data import PreparedData
from orchestrator.run_dir import RunPaths

if TYPE_CHECKING:
    from orchestrator.gpu.budget import GpuPlan
    from orchestrator.gpu.footprints import Footprint
    from orchestrator.pipeline import RunOptions

log = logging.getLogger(__name__)


def backend_spec(config: RunConfig) -> tuple[str, dict[str, Any]]:
    """The backend name and constructor options the workers build."""
    backend = config.backend
    if backend.name == "frangi":
        if backend.model_path is None:
            return "frangi", {}
        from models.frangi_head import load_head

        load_head(backend.model_path)  # a wrong folder is refused before Ray starts
        return "frangi", {"head_path": str(Path(backend.model_path).expanduser().resolve())}
    if backend.model_path is None:
        raise UserError(
            "backend sa2va needs a model: pass --model-path (a local folder, e.g. from "
            "`huggingface-cli download ByteDance/Sa2VA-4B --local-dir ./Sa2VA-4B`, or a hub id "
            "with backend.revision pinned in the config)"
        )
    return "sa2va", {
        "model_path": backend.model_path,
        "revision": backend.revision,
        "device": backend.device,
        "allow_unpinned_remote_code": backend.allow_unpinned_remote_code,
        "max_new_tokens": backend.max_new_tokens,
    }


def check_model_source(config: RunConfig, local: bool = True) -> None:
    """Refuse, before Ray starts, a Sa2VA setup the workers would refuse (``models.sa2va.
    preflight``): no model, a missing folder, an unpinned Hub id, remote code this environment
    cannot load, or no CUDA. ``local=False`` (joining a cluster) skips the device check: the
    driver's node may have no GPU; ``cuda:N`` is refused there (the plan places the workers on
    a cluster's GPUs, see ``budget.restrict_to_device``). On a cluster the folder must exist at
    the same path on the driver's node as on the GPU nodes."""
    name, options = backend_spec(config)
    if name == "sa2va":
        from models.sa2va import preflight
        from orchestrator.gpu.devices import refuse_pinned_gpu_on_cluster

        if not local:
            refuse_pinned_gpu_on_cluster(options["device"])
        try:
            preflight(
                options["model_path"],
                options["revision"],
                options["allow_unpinned_remote_code"],
                device=options["device"] if local or options["device"] == "cpu" else None,
                environment=config.backend.runtime_env is None,
            )
        except UserError as err:
            raise UserError(
                f"{err} (Run config keys: backend.model_path or --model-path, backend.revision, "
                "backend.device, backend.allow_unpinned_remote_code.)"
            ) from None


def gpu_plan(config: RunConfig, address: str | None) -> GpuPlan | None:
    """The GPU memory plan (None for the CPU backend); raises before anything loads when no
    worker fits. Call after ``ray.init`` when joining a cluster (its GPUs are read there)."""
    from orchestrator.gpu import budget as gb
    from orchestrator.gpu import devices
    from orchestrator.gpu import inventory as gpu_inventory

    if config.backend.name == "frangi":
        return None
    if config.gpu.inventory:
        inventory = gpu_inventory.parse_inventory(config.gpu.inventory)
    elif address:
        inventory = gpu_inventory.read_cluster_inventory()
    else:
        inventory = (gpu_inventory.read_local_node(),)
    inventory = devices.restrict_to_device(inventory, config.backend.device)
    footprint = worker_footprint(config)
    plan = gb.build_plan(inventory, footprint, gpu_inventory.gb_to_mb(config.gpu.margin_gb))
    plan.require_workers()
    return plan


def worker_footprint(config: RunConfig) -> Footprint:
    """A Sa2VA worker's footprint: the model folder's weights in the dtype the workers load
    (``backend.model_size`` must agree with them), or the declared size where the files are
    not on this machine (a Hub id not downloaded yet), which the plan then says."""
    from models.sa2va.checkpoint_size import loaded_dtype, read_model_weights
    from orchestrator.gpu import footprints

    backend = config.backend
    model_path = backend_spec(config)[1]["model_path"]
    checkpoint = read_model_weights(model_path, backend.revision)
    if checkpoint is None:
        print(
            f"  GPU plan: the weights of {model_path} are not on this machine; planned "
            f"as Sa2VA-{backend.model_size or '4B'} (backend.model_size)"
        )
    dtype = loaded_dtype(backend.device)
    return footprints.footprint_for(
        "sa2va", backend.model_size, config.gpu.model_gb, checkpoint=checkpoint, dtype=dtype
    )


def start_ray(options: RunOptions, plan: GpuPlan | None) -> None:
    """Join ``--address`` or start a local Ray bound to 127.0.0.1 (with the plan's resources)."""
    import ray

    common: dict[str, Any] = {"namespace": "sa2va_rl", "log_to_driver": True}
    if options.address:
        ray.init(address=options.address, **common)
        return
    kwargs: dict[str, Any] = {}
    if plan is not None:
        os.environ.update(plan.local_node.env())
        kwargs = plan.ray_init_kwargs()
    ray.init(
        address="local",  # never join another cluster running on this machine by accident
        num_cpus=options.num_cpus,
        include_dashboard=options.dashboard,
        dashboard_host="127.0.0.1",
        **kwargs,
        **common,
    )


def check_shared_storage(config: RunConfig, paths: RunPaths, prepared: PreparedData) -> None:
    """On a multi-node cluster, check that every node sees the run directory and the cache (a
    marker file the driver writes) and the data folder at the driver's paths: trials and workers
    use them on any node, and would otherwise fail minutes later, far from the cause."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    cache = Path(config.workers.cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    nonce = os.urandom(8).hex()
    markers = {str(folder / f".sa2va-rl-shared-{nonce}"): nonce for folder in (paths.root, cache)}
    for marker in markers:
        Path(marker).write_text(nonce)
    probe = ray.remote(num_cpus=0)(unseen_paths)
    try:
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(markers, [prepared.data_dir])
            for node in nodes
        ]
        unseen = ray.get(refs)
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
    missing = [
        f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) does not see {', '.join(found)}"
        for node, found in zip(nodes, unseen, strict=True)
        if found
    ]
    if missing:
        raise UserError(
            f"shared storage: {'; '.join(missing)}. On a multi-node cluster --output, --data "
            "and --cache-dir must be on storage every node mounts at the same path (e.g. NFS; "
            "see docs/cluster.md, 'Shared storage and more machines')."
        )


def unseen_paths(markers: dict[str, str], folders: list[str]) -> list[str]:
    """Folders this node does not see: of ``markers`` (marker file -> its content) and of
    ``folders`` (which must exist)."""
    unseen = []
    for marker, nonce in markers.items():
        path = Path(marker)
        if not path.is_file() or path.read_text() != nonce:
            unseen.append(str(path.parent))
    return unseen + [folder for folder in folders if not Path(folder).is_dir()]


def start_segmentation_workers(config: RunConfig, plan: GpuPlan | None, run_id: str) -> list[str]:
    """Run ``run_id``'s workers: one per planned GPU, all at the smallest planned input cap
    (:func:`~orchestrator.inference.pool.pool_input_cap`), or ``workers.cpu_workers`` CPU
    workers (call after ``ray.init``: "auto" counts the cluster's CPUs)."""
    import ray

    from orchestrator.config import cpu_worker_count
    from orchestrator.gpu import budget as gb
    from orchestrator.gpu import devices
    from orchestrator.inference.backend_spec import BackendSpec
    from orchestrator.inference.gpu_memory import MemoryShare
    from orchestrator.inference.pool import (
        WorkerPlacement,
        pool_input_cap,
        run_prefix,
        start_workers,
    )

    name, backend_options = backend_spec(config)
    if plan is not None:
        backend_options["device"] = devices.worker_device(config.backend.device)
    runtime_env = config.backend.runtime_env
    options = {"runtime_env": runtime_env} if runtime_env is not None else {}
    if plan is None:
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        count = cpu_worker_count(config.workers.cpu_workers, cpus)
        placements = [WorkerPlacement(options=options) for _ in range(count)]
    else:
        on_gpu = config.backend.device != "cpu"
        placements = [
            WorkerPlacement(
                num_gpus=1,
                input_cap=slot.input_cap,
                resources={gb.WORKER_SLOT_RESOURCE: 1.0},
                options=options,
                memory_share=(
                    MemoryShare(plan.footprint.weights_mb, slot.worker_mb) if on_gpu else None
                ),
            )
            for slot in plan.workers
        ]
        caps = sorted({slot.input_cap for slot in plan.workers if slot.input_cap}, reverse=True)
        if len(caps) > 1:
            print(
                f"  the plan allows input caps {caps} px on different GPUs: every worker uses "
                f"{pool_input_cap(placements)} px (one answer per (image, prompt) pair)"
            )
    return start_workers(
        len(placements),
        BackendSpec(name, backend_options),
        config.workers.cache_dir,
        placements=placements,
        memory_cache_bytes=config.workers.memory_cache_mb * 2**20,
        name_prefix=run_prefix(run_id),
    )


def gpu_memory_lines(workers: list[dict[str, Any]]) -> list[str]:
    """Each GPU worker's measured memory against the plan (none for CPU workers)."""
    from orchestrator.inference.gpu_memory import describe

    return [describe(w["gpu_memory"]) for w in workers if w.get("gpu_memory")]
