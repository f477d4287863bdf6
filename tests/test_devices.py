"""``backend.device`` means the same GPU in the driver and in a worker, and a worker's refusal
reaches the user as its message.

A worker on a planned GPU sees only that GPU (Ray sets its ``CUDA_VISIBLE_DEVICES``), so in a
run ``cuda:N`` restricts the plan to the N-th GPU and the worker loads on ``cuda``; on a
cluster ``cuda:N`` is refused before Ray starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.errors import UserError
from orchestrator import cli, cluster
from orchestrator.commands import run as run_command
from orchestrator.config import parse_config
from orchestrator.gpu import budget as gb
from orchestrator.gpu import devices
from orchestrator.gpu.inventory import parse_inventory
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.gpu_memory import MemoryShare

PARAMS_4B = 3_937_000_000
"""Sa2VA-4B in the footprint table: 7510 MB of bf16 weights, 9622 MB a worker at 1024 px."""


@pytest.fixture(scope="module")
def folder_4b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "Sa2VA-4B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    index = {"metadata": {"total_size": PARAMS_4B * 2}, "weight_map": {}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def config(folder: Path, device: str, inventory: str = "24:20,24:4") -> Any:
    backend = {"name": "sa2va", "model_path": str(folder), "device": device}
    return parse_config({"backend": backend, "gpu": {"inventory": inventory}})


def test_cuda_n_plans_only_gpu_n(folder_4b: Path) -> None:
    plan = cluster.gpu_plan(config(folder_4b, "cuda:1"), None)
    assert plan is not None
    assert [(g.gpu, g.worker_mb, g.input_cap) for g in plan.workers] == [(1, 9622, 1024)]
    assert plan.local_node.env()["CUDA_VISIBLE_DEVICES"] == "1"
    # auto: every GPU that fits (GPU 0 has 4 GB free, too little).
    plan = cluster.gpu_plan(config(folder_4b, "auto"), None)
    assert plan is not None and [g.gpu for g in plan.workers] == [1]
    with pytest.raises(gb.PlanError, match="node0 GPU 0, has 4096 MB free"):
        cluster.gpu_plan(config(folder_4b, "cuda:0"), None)


def test_cuda_n_beyond_the_gpus_or_on_a_cluster_is_refused(folder_4b: Path) -> None:
    with pytest.raises(UserError, match=r"'cuda:2': node0 has 2 GPU\(s\) \(cuda:0..cuda:1 in"):
        cluster.gpu_plan(config(folder_4b, "cuda:2"), None)
    with pytest.raises(UserError, match="names one GPU of one machine, but this run plans"):
        cluster.gpu_plan(config(folder_4b, "cuda:0", "24:0;24:0"), None)
    # Joining a cluster: refused in the config stage, before the preflight (and Ray).
    with pytest.raises(UserError, match="'cuda:1' names one GPU of one machine"):
        cluster.check_model_source(config(folder_4b, "cuda:1"), local=False)
    assert devices.restrict_to_device(parse_inventory("24:0;24:0"), "cuda") == parse_inventory(
        "24:0;24:0"
    )


def test_a_planned_worker_loads_on_its_only_gpu(
    folder_4b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: dict[str, Any] = {}

    def start_workers(n: int, factory: BackendSpec, cache: str, **kw: Any) -> list[str]:
        started.update(n=n, factory=factory, placements=kw["placements"])
        return ["w0"]

    monkeypatch.setattr("orchestrator.inference.pool.start_workers", start_workers)
    run_config = config(folder_4b, "cuda:1")
    plan = cluster.gpu_plan(run_config, None)
    assert cluster.start_segmentation_workers(run_config, plan, "run-a") == ["w0"]
    assert started["factory"].options["device"] == "cuda"
    (placement,) = started["placements"]
    assert (placement.num_gpus, placement.input_cap) == (1, 1024)
    assert placement.memory_share == MemoryShare(weights_mb=7510, worker_mb=9622)
    assert [devices.worker_device(d) for d in ("auto", "cuda", "cuda:3", "cpu")] == [
        "auto",
        "cuda",
        "cuda",
        "cpu",
    ]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_workers_refusal_reaches_the_user_as_its_message(
    folder_4b: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No CUDA in the worker's process: Sa2VA refuses device cuda:0 while the worker loads.
    (Without a plan the device goes to the worker as configured.)"""
    run_config = parse_config(
        {
            "backend": {"name": "sa2va", "model_path": str(folder_4b), "device": "cuda:0"},
            "workers": {"cpu_workers": 1, "cache_dir": str(folder_4b.parent / "cache")},
        }
    )
    with pytest.raises(UserError) as refused:
        cluster.start_segmentation_workers(run_config, None, "run-refused")
    message = refused.value.in_words({})
    assert message.startswith("Sa2VA needs a CUDA GPU, and device 'cuda:0' found none")
    assert "Traceback" not in message and "ActorDiedError" not in message

    def raise_it(args: Any) -> int:
        raise refused.value

    monkeypatch.setattr(run_command, "run", raise_it)
    assert cli.main(["run"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("sa2va-rl run: error: Sa2VA needs a CUDA GPU, and device 'cuda:0'")
    assert "Traceback" not in err and "pid=" not in err
