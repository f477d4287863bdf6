"""Read the GPU inventory (total and used memory per GPU) with NVML, locally or on every node.

``read_local_node`` asks NVML on this machine (``nvidia-ml-py``'s ``pynvml`` when installed,
else the copy Ray ships); ``read_cluster_inventory`` runs it as a zero-CPU Ray task pinned to
each alive node of a connected cluster. "Used" is everything NVML counts, other users' processes
included, which is the point: the plan must fit around them. Without a GPU or an NVIDIA driver
the node comes back with no GPUs and a ``note`` saying why, never an exception.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from models.errors import UserError

BYTES_PER_MB = 2**20
MB_PER_GB = 1024
INVENTORY_FORMAT = (
    "GPUs as TOTAL:USED in GB, ',' between GPUs, ';' between nodes, "
    "e.g. --inventory '24:7.5,24:9.5;24:0'"
)


def gb_to_mb(gb: float) -> int:
    """Whole MB (MiB) in ``gb`` GB (GiB)."""
    return round(gb * MB_PER_GB)


def mb_to_gb(mb: int) -> float:
    """GB (GiB) in ``mb`` MB (MiB)."""
    return mb / MB_PER_GB


class GpuInfo(NamedTuple):
    """One GPU as the inventory saw it (``gpu`` is NVML's index, PCI bus order)."""

    gpu: int
    total_mb: int
    used_mb: int
    name: str = ""
    uuid: str = ""

    @property
    def free_mb(self) -> int:
        return max(0, self.total_mb - self.used_mb)


@dataclass(frozen=True)
class NodeInventory:
    """The GPUs of one node; ``note`` says why there are none when NVML found none."""

    node: str
    gpus: tuple[GpuInfo, ...]
    note: str = ""


def parse_inventory(spec: str) -> tuple[NodeInventory, ...]:
    """Parse ``--inventory``: ``TOTAL:USED`` in GB per GPU, ``,`` between GPUs, ``;`` between
    nodes. Nodes are named ``node0``, ``node1``, ... Raises UserError naming the bad token."""
    nodes = []
    for n, node_spec in enumerate(spec.split(";")):
        if not node_spec.strip():
            raise UserError(f"--inventory {spec!r}: node {n} is empty. Format: {INVENTORY_FORMAT}")
        gpus = tuple(_parse_gpu(tok, n, i, spec) for i, tok in enumerate(node_spec.split(",")))
        nodes.append(NodeInventory(f"node{n}", gpus))
    return tuple(nodes)


def _parse_gpu(token: str, node: int, index: int, spec: str) -> GpuInfo:
    where = f"--inventory {spec!r}: GPU entry {token.strip()!r} (node {node}, GPU {index})"
    parts = token.split(":")
    if len(parts) != 2:
        raise UserError(f"{where} is not TOTAL:USED. Format: {INVENTORY_FORMAT}")
    try:
        total_gb, used_gb = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"{where} has a non-number. Format: {INVENTORY_FORMAT}") from None
    if not (0 < total_gb < math.inf and 0 <= used_gb <= total_gb):
        raise UserError(
            f"{where}: need TOTAL > 0 and 0 <= USED <= TOTAL (GB). Format: {INVENTORY_FORMAT}"
        )
    return GpuInfo(index, gb_to_mb(total_gb), gb_to_mb(used_gb))


def load_nvml() -> Any:
    """The pynvml module: nvidia-ml-py's if installed, else Ray's bundled copy."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        import ray._private.thirdparty.pynvml as pynvml
    return pynvml


def read_local_node(
    node: str = "local", nvml: Any = None, environ: Mapping[str, str] = os.environ
) -> NodeInventory:
    """The GPUs of this machine that ``CUDA_VISIBLE_DEVICES`` (if set) lets this process use.

    Args:
        node: name for the node in the plan.
        nvml: a pynvml-like module (tests pass a fake); default :func:`load_nvml`.
        environ: where ``CUDA_VISIBLE_DEVICES`` is read.
    """
    nvml = nvml if nvml is not None else load_nvml()
    try:
        nvml.nvmlInit()
    except Exception as err:  # NVMLError or OSError: no driver/library, i.e. no usable GPU
        return NodeInventory(node, (), note=f"NVML unavailable: {err}")
    try:
        gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    finally:
        nvml.nvmlShutdown()
    visible = _visible(gpus, environ.get("CUDA_VISIBLE_DEVICES"))
    note = "" if visible else "NVML sees no GPU (or CUDA_VISIBLE_DEVICES hides them all)"
    return NodeInventory(node, visible, note)


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    # Round in the safe direction: total down, used up.
    total_mb = memory.total // BYTES_PER_MB
    used_mb = -(-memory.used // BYTES_PER_MB)
    return GpuInfo(
        index,
        total_mb,
        used_mb,
        _text(nvml.nvmlDeviceGetName(handle)),
        _text(nvml.nvmlDeviceGetUUID(handle)),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _visible(gpus: tuple[GpuInfo, ...], cuda_visible: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names (NVML indices or UUID prefixes), in its order.

    Like CUDA, stop at the first entry that names no GPU (so ``-1`` or ``""`` hide them all).
    """
    if cuda_visible is None:
        return gpus
    kept: list[GpuInfo] = []
    for entry in (e.strip() for e in cuda_visible.split(",")):
        match = next(
            (g for g in gpus if entry in (str(g.gpu), g.uuid) or _uuid_prefix(entry, g)), None
        )
        if match is None:
            break
        if match not in kept:
            kept.append(match)
    return tuple(kept)


def _uuid_prefix(entry: str, gpu: GpuInfo) -> bool:
    return entry.startswith("GPU-") and bool(gpu.uuid) and gpu.uuid.startswith(entry)


def read_cluster_inventory(timeout_s: float = 60.0) -> tuple[NodeInventory, ...]:
    """Read every alive node of the Ray cluster this process is connected to (``ray.init``
    first). Nodes are named ``<ip>/<first 8 hex of the node id>``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reader = ray.remote(num_cpus=0)(read_local_node)
    refs = [
        reader.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}")
        for n in ray.nodes()
        if n["Alive"]
    ]
    return tuple(ray.get(refs, timeout=timeout_s))
