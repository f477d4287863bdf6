"""The smoke run on a two-node Ray cluster with fake GPUs, joined through ``--address``.

Two nodes with two declared 24 GB GPUs each (``--inventory 24:0,24:0;24:0,24:21.8``: the last
one so busy that the plan, sized from the tiny model folder itself, allows it only a 512 px input
cap where the others get 1024), each node started
with its share of the GPU plan (``NodePlan.ray_node_args()``: ``num_gpus=2``, two worker slots,
``gpu_mem_mb``, ``CUDA_VISIBLE_DEVICES``) and one CPU, the way ``ray start`` does it on a real
cluster. The run uses the Sa2VA backend on the tiny remote-code model folder (device cpu), so the
plan asks for four segmentation workers, one per GPU, and Ray has to spread them over both nodes;
all four work at the smallest planned cap, so the run never refuses its uneven pool.
Ray hands out its GPU ids without touching hardware, which is all the placement relies on. Both
nodes share this machine's filesystem, the stand-in for the shared storage a real cluster needs;
the run's shared-storage check passes on it, and refuses a folder the nodes do not see.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from tiny_sa2va import write_tiny_sa2va

from envs.sources import DataRef
from models.errors import UserError
from orchestrator import cluster as run_cluster
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.data import PreparedData
from orchestrator.gpu import budget as gb
from orchestrator.gpu import inventory as gpu_inventory
from orchestrator.run_dir import RunPaths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INVENTORY = "24:0,24:0;24:0,24:21.8"
EXPERIMENTS = ("prompt", "finetune")
"""Experiment 1, and experiment 4 with the reward net it waits for: Sa2VA's head fine-tuned in
trials over frozen inputs the workers compute (the trials reserve the trial GPU, which these fake
GPUs cannot give them: they train on the CPU); the other trials add time, not cluster
behaviour."""
TRIALS = {"prompt", "reward_net", "reward_finetune", "supervised_finetune"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sa2va(tmp_path_factory.mktemp("model") / "tiny_sa2va_v2")


@pytest.fixture(scope="module")
def plan(model: Path) -> gb.GpuPlan:
    """The plan the run makes (sized from the tiny folder itself), which the nodes start with."""
    config = load_config(
        CONFIG_DIR / "smoke.yaml",
        {"backend": {"name": "sa2va", "model_path": str(model), "device": "cpu"}},
    )
    footprint = run_cluster.worker_footprint(config)
    plan = gb.build_plan(gpu_inventory.parse_inventory(INVENTORY), footprint, 1024)
    assert [len(node.worker_gpus) for node in plan.nodes] == [2, 2]
    assert [slot.input_cap for slot in plan.workers] == [1024, 1024, 1024, 512]
    return plan


@pytest.fixture(scope="module")
def cluster(plan: gb.GpuPlan) -> Iterator[tuple[Cluster, str, list[str]]]:
    """The two nodes; the head also runs the dashboard (127.0.0.1) for the state API."""
    dashboard_port = free_port()
    local = Cluster()
    try:
        head_args: dict[str, Any] = {
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        }
        node_ids = [
            local.add_node(
                num_cpus=1, **node.ray_node_args(), **(head_args if i == 0 else {})
            ).node_id
            for i, node in enumerate(plan.nodes)
        ]
        yield local, f"http://127.0.0.1:{dashboard_port}", node_ids
    finally:
        if ray.is_initialized():
            ray.shutdown()
        local.shutdown()


@pytest.fixture(scope="module")
def sa2va_run(
    cluster: tuple[Cluster, str, list[str]],
    model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, int]:
    """``sa2va-rl run`` of the smoke config with the tiny Sa2VA model, joining the cluster."""
    local, _dashboard, _nodes = cluster
    base = tmp_path_factory.mktemp("multinode")
    config = base / "smoke-sa2va-cpu.yaml"
    config.write_text(
        yaml.safe_dump({"extends": str(CONFIG_DIR / "smoke.yaml"), "backend": {"device": "cpu"}})
    )
    root = base / "run"
    args = [
        *("--address", local.address, "--config", str(config)),
        *("--backend", "sa2va", "--model-path", str(model), "--inventory", INVENTORY),
        *("--output", str(root), "--cache-dir", str(base / "cache")),
        *(arg for experiment in EXPERIMENTS for arg in ("--experiment", experiment)),
    ]
    # A driver process of its own, as `ray job submit` runs it (and this test process keeps no
    # Ray state of the run).
    driver = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", *args],
        capture_output=True,
        text=True,
        timeout=280,
    )
    (base / "driver.log").write_text(driver.stdout + driver.stderr)
    code = driver.returncode
    return root, code


def worker_actors(dashboard: str) -> list[Any]:
    return list_actors(
        address=dashboard,
        filters=[("class_name", "=", "SegmentationWorker")],
        detail=True,
        raise_on_missing_output=False,
    )


def test_smoke_run_completes_on_the_cluster(sa2va_run: tuple[Path, int]) -> None:
    root, code = sa2va_run
    assert code == 0, (root.parent / "driver.log").read_text()[-3000:]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["backend"] == "sa2va"
    assert summary["backend_id"].endswith(":cap-512")  # the smallest planned, for every worker
    assert summary["trials"] == {t: "TERMINATED" for t in TRIALS}
    assert summary["inference"]["workers"] == 4
    assert summary["inference"]["forward_passes"] > 0
    assert summary["methods"]["baseline"]["n"] == 6
    # Sa2VA's head, fine-tuned in Tune trials over frozen inputs from the workers on the other
    # node(s), exported as model folders and evaluated on the same test images.
    for name in ("reward_finetune", "supervised_finetune"):
        assert summary["methods"][name]["n"] == 6
        assert (root / "finetune" / name / "model" / "provenance.json").is_file()


def test_one_segmentation_worker_per_gpu_across_nodes(
    cluster: tuple[Cluster, str, list[str]], sa2va_run: tuple[Path, int]
) -> None:
    local, dashboard, (node0, node1) = cluster
    root, _code = sa2va_run
    saved_plan = json.loads((root / "gpu_plan.json").read_text())
    assert saved_plan["workers"] == 4
    actors = worker_actors(dashboard)
    run_id = (root / "run_id").read_text().strip()
    assert sorted(a.name for a in actors) == [f"{run_id}:segmentation-worker-{i}" for i in range(4)]
    # Two workers on each node, and each node has exactly two Ray GPUs: one worker per GPU.
    assert Counter(a.node_id for a in actors) == {node0: 2, node1: 2}
    for actor in actors:
        assert actor.required_resources == {"GPU": 1.0, gb.WORKER_SLOT_RESOURCE: 1.0}
        assert actor.num_restarts == 0
    # The run is over: its workers ended with the driver instead of holding the GPUs.
    assert {a.state for a in actors} == {"DEAD"}
    ray.init(address=local.address, log_to_driver=False)
    try:
        assert ray.cluster_resources()["GPU"] == ray.available_resources()["GPU"] == 4
    finally:
        ray.shutdown()


def test_a_folder_some_node_does_not_see_is_refused(
    cluster: tuple[Cluster, str, list[str]], sa2va_run: tuple[Path, int], tmp_path: Path
) -> None:
    """The shared-storage check the run passed above, failing: no node sees the data folder."""
    local, _dashboard, node_ids = cluster
    root, _code = sa2va_run
    config = load_config(str(root / "config.yaml"))
    prepared = PreparedData(DataRef(str(tmp_path / "absent")), {})
    ray.init(address=local.address, log_to_driver=False)
    try:
        with pytest.raises(UserError) as refused:
            run_cluster.check_shared_storage(config, RunPaths(root), prepared)
    finally:
        ray.shutdown()
    message = str(refused.value)
    for node_id in node_ids:
        assert f"({node_id[:8]}) does not see {tmp_path / 'absent'}" in message
    assert "must be on storage every node mounts at the same path" in message
    assert not list(root.glob(".sa2va-rl-shared-*"))  # the markers are cleaned up


def test_unseen_paths_lists_what_this_node_does_not_see(tmp_path: Path) -> None:
    seen, stale, gone = (tmp_path / name for name in ("seen", "stale", "gone"))
    for folder in (seen, stale):
        folder.mkdir()
    (seen / "marker").write_text("n1")
    (stale / "marker").write_text("old")
    markers = {str(seen / "marker"): "n1", str(stale / "marker"): "n1", str(gone / "m"): "n1"}
    assert run_cluster.unseen_paths(markers, [str(seen), str(gone)]) == [
        str(stale),
        str(gone),
        str(gone),
    ]
