"""The GPU plan enforced by a real (local, multi-node) Ray cluster with fake GPUs.

Two nodes x two GPUs, declared as ``24:20,24:4;24:12,24:12`` and planned for Sa2VA-4B
(9622 MB per worker at 1024 px + 1024 MB margin):
- node0: GPU 0 has 4096 MB free (no worker), GPU 1 gets a worker and keeps 9834 MB for trials;
- node1: both GPUs get a worker and keep 1642 MB each.
Each node is started with the plan's ``ray_node_args()`` (num_gpus, custom resources and the
``CUDA_VISIBLE_DEVICES`` order), exactly as ``ray start`` / ``ray.init`` would be. No real GPU is
touched: Ray hands out GPU ids without checking hardware, which is all the pinning relies on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from orchestrator.gpu import budget as gb  # noqa: E402
from orchestrator.gpu import devices, footprints  # noqa: E402
from orchestrator.gpu import inventory as gpu_inventory  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INVENTORY = "24:20,24:4;24:12,24:12"
NAMESPACE = "gpu-budget-test"
EVENT_LOG = "gpu-budget-events"
HUNGRY_MB = 6000
"""More than node1's 1642 MB, and two of them more than node0's 9834 MB: one at a time."""
HOLD_REPORTS = 15
"""How long (x 0.2 s) the first hungry trial keeps its memory unless the other one starts."""

# Ray workers cannot import this test module; its classes and functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[gb.GpuPlan, list[str]]]:
    plan = gb.build_plan(
        gpu_inventory.parse_inventory(INVENTORY), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    assert [n.gpu_mem_mb for n in plan.nodes] == [9834, 1642]
    assert [n.cuda_visible_devices for n in plan.nodes] == ["1,0", "0,1"]
    local = Cluster()
    try:
        node_ids = [
            local.add_node(num_cpus=2, **node.ray_node_args()).node_id for node in plan.nodes
        ]
        ray.init(address=local.address, namespace=NAMESPACE, log_to_driver=False)
        yield plan, node_ids
    finally:
        ray.shutdown()
        local.shutdown()


@ray.remote
class Probe:
    """Stands in for the segmentation worker: reports where Ray put it."""

    def where(self) -> tuple[str, list[Any], str | None]:
        return (
            ray.get_runtime_context().get_node_id(),
            [str(i) for i in ray.get_gpu_ids()],
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )


@ray.remote(num_cpus=0)
class EventLog:
    """Ordered start/end events of the trials (a sequence, not timestamps)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def record(self, event: str) -> None:
        self.events.append(event)

    def other_holding(self, me: str) -> bool:
        """Whether another trial has started and not ended."""
        others = [e for e in self.events if not e.startswith(f"{me}:")]
        return sum(e.endswith(":start") for e in others) > sum(e.endswith(":end") for e in others)

    def all(self) -> list[str]:
        return list(self.events)


def hungry_trial(config: dict[str, Any]) -> None:
    """Holds HUNGRY_MB of trial GPU memory until the other trial holds it too (it must not)
    or the hold ends, then lets go."""
    log = ray.get_actor(EVENT_LOG, namespace=NAMESPACE)
    me = config["name"]
    ray.get(log.record.remote(f"{me}:start"))
    overlapped = False
    for _ in range(HOLD_REPORTS):
        overlapped = ray.get(log.other_holding.remote(me))
        if overlapped:
            break
        time.sleep(0.2)
    ray.get(log.record.remote(f"{me}:end"))
    tune.report(
        {
            "device": devices.trial_cuda_device(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "overlapped": overlapped,
        }
    )


def test_one_worker_per_planned_gpu_across_nodes(cluster: tuple[gb.GpuPlan, list[str]]) -> None:
    _plan, (node0, node1) = cluster
    assert ray.cluster_resources()["GPU"] == 3  # node0's busy GPU 0 is not a Ray GPU
    assert ray.cluster_resources()[gb.WORKER_SLOT_RESOURCE] == 3
    actors = [Probe.options(**devices.worker_actor_options()).remote() for _ in range(4)]
    try:
        refs = [a.where.remote() for a in actors]
        ready, pending = ray.wait(refs, num_returns=3, timeout=60)
        assert sorted(ray.get(ready)) == sorted(
            [(node0, ["1"], "1"), (node1, ["0"], "0"), (node1, ["1"], "1")]
        )
        # The fourth worker has no planned GPU left: it waits instead of doubling up.
        assert ray.available_resources().get("GPU", 0) == 0
        assert ray.wait(pending, timeout=1)[0] == []
    finally:
        for actor in actors:
            ray.kill(actor)


def test_memory_hungry_trial_waits_for_the_memory(
    cluster: tuple[gb.GpuPlan, list[str]], tmp_path: Path
) -> None:
    _plan, (node0, _node1) = cluster
    log = EventLog.options(name=EVENT_LOG).remote()
    try:
        tuner = tune.Tuner(
            tune.with_resources(hungry_trial, devices.trial_resources(HUNGRY_MB)),
            param_space={"name": tune.grid_search(["a", "b"])},
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="hungry", verbose=0),
        )
        results = tuner.fit()
        events = ray.get(log.all.remote())
    finally:
        ray.kill(log)
    assert results.num_errors == 0
    first, second = events[0].split(":")[0], events[2].split(":")[0]
    # Never both holding the memory: the second starts only after the first has ended.
    assert events == [f"{first}:start", f"{first}:end", f"{second}:start", f"{second}:end"]
    assert sorted(
        (r.metrics["device"], r.metrics["node_id"], r.metrics["overlapped"]) for r in results
    ) == [("cuda:0", node0, False), ("cuda:0", node0, False)]


def test_cluster_inventory_reads_every_node(cluster: tuple[gb.GpuPlan, list[str]]) -> None:
    _plan, node_ids = cluster
    nodes = gpu_inventory.read_cluster_inventory()
    assert sorted(n.node.split("/")[1] for n in nodes) == sorted(i[:8] for i in node_ids)
    # This machine has no NVIDIA driver: every node says so instead of failing.
    assert all(n.gpus == () and n.note.startswith("NVML unavailable") for n in nodes)
