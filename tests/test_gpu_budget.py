"""The GPU memory plan: exact numbers on the original 4 x 24 GB box, the CLI, NVML reading.

The example inventory is the original team's: 4 x 24 GB with 7.5 / 9.5 / 9.6 / 18.3 GB in use.
In MB (MiB): total 24576; used 7680 / 9728 / 9830 / 18739; free 16896 / 14848 / 14746 / 5837.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from models.errors import UserError
from orchestrator import cli
from orchestrator.gpu import budget as gb
from orchestrator.gpu import devices, footprints
from orchestrator.gpu import inventory as gpu_inventory

BOX = "24:7.5,24:9.5,24:9.6,24:18.3"
FORMAT = gpu_inventory.INVENTORY_FORMAT


@pytest.fixture
def plan_cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``cli.main`` with only the plan command registered, so other commands' state can not
    break these tests (that plan is registered for real is asserted separately)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("orchestrator.commands.plan",))
    return cli.main


def run_json(plan_cli: Any, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert plan_cli(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def gpu(
    n: int, total: int, used: int, worker: int, cap: int | None, left: int, note: str = ""
) -> dict[str, Any]:
    return {
        "gpu": n,
        "total_mb": total,
        "used_mb": used,
        "free_mb": total - used,
        "worker_mb": worker,
        "input_cap": cap,
        "left_mb": left,
        "note": note,
    }


def test_plan_command_is_registered() -> None:
    assert "orchestrator.commands.plan" in cli.COMMAND_MODULES


# --- inventory parsing -------------------------------------------------------------------------


def test_parse_inventory_in_whole_mb() -> None:
    (node,) = gpu_inventory.parse_inventory(BOX)
    assert node.node == "node0"
    assert [(g.gpu, g.total_mb, g.used_mb, g.free_mb) for g in node.gpus] == [
        (0, 24576, 7680, 16896),
        (1, 24576, 9728, 14848),
        (2, 24576, 9830, 14746),
        (3, 24576, 18739, 5837),
    ]


def test_parse_inventory_nodes_and_spaces() -> None:
    nodes = gpu_inventory.parse_inventory(" 24:7.5 , 24:9.5 ; 80:0")
    assert [(n.node, [(g.gpu, g.total_mb, g.used_mb) for g in n.gpus]) for n in nodes] == [
        ("node0", [(0, 24576, 7680), (1, 24576, 9728)]),
        ("node1", [(0, 81920, 0)]),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("24", "--inventory '24': GPU entry '24' (node 0, GPU 0) is not TOTAL:USED"),
        (
            "24:7.5,24:x",
            "--inventory '24:7.5,24:x': GPU entry '24:x' (node 0, GPU 1) has a non-number",
        ),
        (
            "24:7.5;24:30",
            "--inventory '24:7.5;24:30': GPU entry '24:30' (node 1, GPU 0): "
            "need TOTAL > 0 and 0 <= USED <= TOTAL (GB)",
        ),
        ("0:0", "--inventory '0:0': GPU entry '0:0' (node 0, GPU 0): need TOTAL > 0"),
        ("24:-1", "--inventory '24:-1': GPU entry '24:-1' (node 0, GPU 0): need TOTAL > 0"),
        ("24:1;", "--inventory '24:1;': node 1 is empty"),
        ("", "--inventory '': node 0 is empty"),
    ],
)
def test_parse_inventory_rejects_bad_tokens(spec: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        gpu_inventory.parse_inventory(spec)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith(f"Format: {FORMAT}")


# --- footprints ---------------------------------------------------------------------------------


def test_sa2va_footprints_from_parameter_counts() -> None:
    table = {
        name: (fp.params_m, fp.weights_mb, fp.worker_mb(256), fp.worker_mb(1024))
        for name, fp in footprints.FOOTPRINTS.items()
    }
    assert table == {
        "frangi": (None, 0, 0, 0),
        "sa2va-1b": (1162, 2217, 3241, 3529),
        "sa2va-4b": (3937, 7510, 9046, 9622),
        "sa2va-8b": (8299, 15830, 17878, 19030),
        "sa2va-26b": (25738, 49092, 52164, 54468),
        "reward-net-train": (None, 512, 1024, 1024),
        "sa2va-head-train": (None, 768, 2048, 2048),
    }
    assert footprints.REWARD_NET_TRAIN_MB == 1024
    assert footprints.SA2VA_HEAD_TRAIN_MB == 2048
    assert not footprints.FOOTPRINTS["frangi"].needs_gpu


@pytest.mark.parametrize(
    ("cap", "tiles"), [(256, 1), (448, 1), (512, 1), (896, 5), (950, 5), (951, 10), (1024, 10)]
)
def test_sa2va_tiles_follow_internvl_dynamic_preprocess(cap: int, tiles: int) -> None:
    assert footprints.sa2va_tiles(cap) == tiles


def test_footprint_for_config_values() -> None:
    assert footprints.footprint_for("sa2va", "8B") is footprints.FOOTPRINTS["sa2va-8b"]
    assert footprints.footprint_for("frangi") is footprints.FOOTPRINTS["frangi"]
    assert footprints.footprint_for("sa2va", "4B", model_gb=15) == footprints.custom_footprint(15)
    assert footprints.custom_footprint(15).worker_mb(256) == 15360
    with pytest.raises(UserError, match="no GPU footprint for backend 'sa2va' size '2B'"):
        footprints.footprint_for("sa2va", "2B")
    with pytest.raises(UserError, match="--model-gb must be a positive number of GB, got 0"):
        footprints.custom_footprint(0)


# --- the plan on the original box --------------------------------------------------------------


def test_cli_model_gb_15_on_the_original_box(plan_cli: Any, capsys: Any) -> None:
    """15 GB + 1 GB margin = 16384 MB: only GPU 0 (16896 free) holds it; GPUs 1 and 2 have
    14848 / 14746 MB free, under 15 GB even without a margin, and GPU 3 has 5837."""
    plan = run_json(plan_cli, capsys, "--inventory", BOX, "--model-gb", "15")
    assert plan == {
        "model": "custom (15 GB)",
        "margin_mb": 1024,
        "feasible": True,
        "workers": 1,
        "nodes": [
            {
                "node": "node0",
                "worker_gpus": [0],
                "trial_gpu": 1,
                "gpu_mem_mb": 13824,
                "env": {
                    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
                    "SA2VA_TRIAL_GPU": "1",
                },
                "num_gpus": 1,
                "resources": {"gpu_mem_mb": 13824, "sa2va_worker_slot": 1},
                "gpus": [
                    gpu(0, 24576, 7680, 15360, 1024, 512),
                    gpu(1, 24576, 9728, 0, None, 13824, "needs 16384 MB free, has 14848"),
                    gpu(2, 24576, 9830, 0, None, 13722, "needs 16384 MB free, has 14746"),
                    gpu(3, 24576, 18739, 0, None, 4813, "needs 16384 MB free, has 5837"),
                ],
            }
        ],
    }


def test_cli_model_gb_13_places_workers_on_gpus_0_1_2_not_3(plan_cli: Any, capsys: Any) -> None:
    """The largest whole-GB model that fits GPUs 0, 1 and 2: 13312 + 1024 <= 14746."""
    plan = run_json(plan_cli, capsys, "--inventory", BOX, "--model-gb", "13")
    (node,) = plan["nodes"]
    assert node["worker_gpus"] == [0, 1, 2]
    assert node["gpus"] == [
        gpu(0, 24576, 7680, 13312, 1024, 2560),
        gpu(1, 24576, 9728, 13312, 1024, 512),
        gpu(2, 24576, 9830, 13312, 1024, 410),
        gpu(3, 24576, 18739, 0, None, 4813, "needs 14336 MB free, has 5837"),
    ]
    # GPU 3 has the most left, so it backs gpu_mem_mb; Ray's 3 GPU slots are GPUs 0, 1, 2.
    assert (node["trial_gpu"], node["gpu_mem_mb"], node["num_gpus"]) == (3, 4813, 3)
    assert node["resources"] == {"gpu_mem_mb": 4813, "sa2va_worker_slot": 3}


def test_cli_table_for_sa2va_4b(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan", "--inventory", BOX, "--model", "sa2va-4b"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "sa2va-4b: a worker needs 9046-9622 MB + 1024 MB margin on one GPU",
        "(GB; 1 GB = 1024 MB)",
        "node   gpu  total  used  free     assigned  left  note",
        "node0    0   24.0   7.5  16.5  9.4 @1024px   6.1",
        "node0    1   24.0   9.5  14.5  9.4 @1024px   4.1",
        "node0    2   24.0   9.6  14.4  9.4 @1024px   4.0",
        "node0    3   24.0  18.3   5.7            -   4.7  needs 10070 MB free, has 5837",
        "Workers: 3 (node0 GPU 0, node0 GPU 1, node0 GPU 2).",
        "node0: trials get GPU 0, gpu_mem_mb=6250 (6 reward-net trainings of 1024 MB).",
        "node0: Ray with CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1,2,3 "
        'SA2VA_TRIAL_GPU=0 num_gpus=3 resources={"gpu_mem_mb": 6250, "sa2va_worker_slot": 3}',
    ]


def test_cli_model_gb_30_is_refused_with_what_to_do(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan", "--inventory", BOX, "--model-gb", "30"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "sa2va-rl plan: error: custom (30 GB) needs one GPU with 31744 MB free (30720 MB for "
        "the model at its smallest input cap + 1024 MB safety margin), but the GPU with the "
        "most free memory, node0 GPU 0, has 16896 MB free (24576 total, 7680 used). Do one of: "
        "use a smaller model with --model (sa2va-1b or sa2va-4b would fit) or the CPU backend "
        "(--model frangi); free 14848 MB more on a GPU (stop other processes on it); lowering "
        "the safety margin alone is not enough (--margin-gb, now 1 GB).\n"
    )


def test_refusal_says_how_far_to_lower_the_margin(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan", "--inventory", "24:9.5", "--model-gb", "14"]) == 2
    err = capsys.readouterr().err
    assert "node0 GPU 0, has 14848 MB free" in err
    assert "free 512 MB more on a GPU" in err
    assert "lower the safety margin to at most 0.50 GB (--margin-gb, now 1 GB)." in err
    assert (
        plan_cli(["plan", "--inventory", "24:9.5", "--model-gb", "14", "--margin-gb", "0.5"]) == 0
    )


def test_sa2va_8b_does_not_fit_the_busy_box_but_4b_does() -> None:
    inventory = gpu_inventory.parse_inventory(BOX)
    plan = gb.build_plan(inventory, footprints.FOOTPRINTS["sa2va-8b"], 1024)
    assert not plan.feasible
    with pytest.raises(gb.PlanError, match="sa2va-8b needs one GPU with 18902 MB free"):
        plan.require_workers()
    gb.build_plan(inventory, footprints.FOOTPRINTS["sa2va-4b"], 1024).require_workers()


def test_input_cap_shrinks_before_the_worker_is_refused() -> None:
    # 9046 (1 tile) fits 10070 - 1024, 9622 (10 tiles at 1024 px) does not.
    plan = gb.build_plan(
        gpu_inventory.parse_inventory("10:0.166"), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    (slot,) = plan.all_gpus
    assert (slot.free_mb, slot.input_cap, slot.worker_mb, slot.left_mb) == (10070, 512, 9046, 0)
    assert plan.nodes[0].trial_gpu is None
    assert plan.nodes[0].ray_resources() == {"sa2va_worker_slot": 1.0}


def test_frangi_plans_no_workers_and_leaves_memory_to_trials(plan_cli: Any, capsys: Any) -> None:
    plan = run_json(plan_cli, capsys, "--inventory", "24:7.5,24:9.5;24:18.3", "--model", "frangi")
    assert [(n["worker_gpus"], n["trial_gpu"], n["gpu_mem_mb"]) for n in plan["nodes"]] == [
        ([], 0, 15872),
        ([], 0, 4813),
    ]
    assert plan["feasible"] is True


# --- no GPU on this machine ---------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    node = gpu_inventory.NodeInventory(
        "local", (), note="NVML unavailable: NVML Shared Library Not Found"
    )
    monkeypatch.setattr(gpu_inventory, "read_local_node", lambda: node)


@pytest.mark.usefixtures("no_gpu")
def test_no_gpu_is_fine_for_frangi(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan", "--model", "frangi"]) == 0
    assert capsys.readouterr().out == (
        "No GPU found (local: NVML unavailable: NVML Shared Library Not Found). The Frangi "
        "backend runs on the CPU and needs none: nothing to plan. To plan for GPUs elsewhere, "
        f"declare them: {FORMAT}.\n"
    )


@pytest.mark.usefixtures("no_gpu")
def test_no_gpu_refuses_sa2va(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "sa2va-rl plan: error: no GPU found (local: NVML unavailable: NVML Shared Library Not "
        "Found). sa2va-4b needs one GPU with 10070 MB free (9046 MB for the model at its "
        "smallest input cap + 1024 MB safety margin). Use --model frangi (CPU, needs no GPU), "
        f"run on a machine with a GPU, or declare GPUs to plan for: {FORMAT}.\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--margin-gb", "-1"], "--margin-gb must be >= 0, got -1"),
        (["--model-gb", "0"], "--model-gb must be a positive number of GB, got 0.0"),
    ],
)
def test_cli_rejects_bad_numbers(plan_cli: Any, capsys: Any, args: list[str], message: str) -> None:
    assert plan_cli(["plan", "--inventory", BOX, *args]) == 2
    assert capsys.readouterr().err == f"sa2va-rl plan: error: {message}\n"


def test_ray_start_args(plan_cli: Any, capsys: Any) -> None:
    assert plan_cli(["plan", "--inventory", "24:20,24:4;24:4", "--ray-start-args"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-5:] == [
        "# Start Ray on each node with (add --head on the head node, else --address=HEAD:6379):",
        "# node0",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1,0 SA2VA_TRIAL_GPU=1 ray start "
        '--num-gpus=1 --resources=\'{"gpu_mem_mb": 9834, "sa2va_worker_slot": 1}\'',
        "# node1",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0 SA2VA_TRIAL_GPU=0 ray start "
        '--num-gpus=1 --resources=\'{"gpu_mem_mb": 9834, "sa2va_worker_slot": 1}\'',
    ]


# --- the Ray-facing API -------------------------------------------------------------------------


def test_local_ray_settings_and_trial_device() -> None:
    plan = gb.build_plan(
        gpu_inventory.parse_inventory("24:20,24:4,24:0"), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    node = plan.local_node
    assert node.worker_gpus == (1, 2)
    assert node.env() == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1,2,0",
        "SA2VA_TRIAL_GPU": "2",
    }
    assert plan.ray_init_kwargs() == {
        "num_gpus": 2,
        "resources": {"gpu_mem_mb": 13930.0, "sa2va_worker_slot": 2.0},
    }
    assert node.ray_node_args() == {**plan.ray_init_kwargs(), "env_vars": node.env()}
    # Inside a trial (no Ray GPU, so the node's CUDA_VISIBLE_DEVICES is untouched):
    assert devices.trial_cuda_device(node.env()) == "cuda:1"
    assert devices.trial_cuda_device({"CUDA_VISIBLE_DEVICES": "0"}) is None
    with pytest.raises(RuntimeError, match="SA2VA_TRIAL_GPU=2 is not in CUDA_VISIBLE_DEVICES"):
        devices.trial_cuda_device({"SA2VA_TRIAL_GPU": "2", "CUDA_VISIBLE_DEVICES": "1"})
    assert devices.trial_resources(1024) == {"cpu": 1.0, "gpu_mem_mb": 1024.0}
    assert devices.worker_actor_options() == {
        "num_gpus": 1,
        "num_cpus": 0,
        "resources": {"sa2va_worker_slot": 1},
    }


def test_multi_node_plan_has_no_local_init() -> None:
    plan = gb.build_plan(
        gpu_inventory.parse_inventory("24:0;24:0"), footprints.FOOTPRINTS["sa2va-1b"], 1024
    )
    with pytest.raises(ValueError, match="the plan has 2 nodes"):
        plan.ray_init_kwargs()


def test_require_trial_memory() -> None:
    plan = gb.build_plan(
        gpu_inventory.parse_inventory(BOX), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    plan.require_trial_memory(6250)
    with pytest.raises(gb.PlanError) as err:
        plan.require_trial_memory(6251, "reward-net training")
    assert str(err.value) == (
        "reward-net training needs 6251 MB of GPU memory, but the most any node has left for "
        "trials is 6250 MB. Use a smaller segmentation model, free memory on a GPU, lower "
        "--margin-gb (now 1), or run reward-net training on the CPU."
    )


def test_plan_error_is_a_user_error() -> None:
    assert issubclass(gb.PlanError, UserError)


# --- NVML ---------------------------------------------------------------------------------------


class FakeNvml:
    """Two 24 GB GPUs (bytes, as NVML reports), the second with 9.5 GB + 1 byte used."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.shutdowns = 0
        self.devices = [
            (24 * 2**30, int(7.5 * 2**30), b"NVIDIA A10", "GPU-aaaa-0000"),
            (24 * 2**30, int(9.5 * 2**30) + 1, "NVIDIA A10", "GPU-bbbb-1111"),
        ]

    def nvmlInit(self) -> None:
        if self.fail:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.devices[h][0], used=self.devices[h][1])

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return self.devices[h][2]

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.devices[h][3]


def test_read_local_node_with_nvml() -> None:
    nvml = FakeNvml()
    node = gpu_inventory.read_local_node("box", nvml=nvml, environ={})
    assert node == gpu_inventory.NodeInventory(
        "box",
        (
            gpu_inventory.GpuInfo(0, 24576, 7680, "NVIDIA A10", "GPU-aaaa-0000"),
            gpu_inventory.GpuInfo(1, 24576, 9729, "NVIDIA A10", "GPU-bbbb-1111"),  # used rounds up
        ),
    )
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(
    ("visible", "gpus"),
    [("1", [1]), ("1,0", [1, 0]), ("GPU-bbbb", [1]), ("0,7,1", [0]), ("-1", []), ("", [])],
)
def test_read_local_node_honours_cuda_visible_devices(visible: str, gpus: list[int]) -> None:
    node = gpu_inventory.read_local_node(nvml=FakeNvml(), environ={"CUDA_VISIBLE_DEVICES": visible})
    assert [g.gpu for g in node.gpus] == gpus
    assert node.note == (
        "" if gpus else "NVML sees no GPU (or CUDA_VISIBLE_DEVICES hides them all)"
    )


def test_read_local_node_without_driver() -> None:
    node = gpu_inventory.read_local_node(nvml=FakeNvml(fail=True))
    assert node == gpu_inventory.NodeInventory(
        "local", (), note="NVML unavailable: NVML Shared Library Not Found"
    )


def test_only_gpu_trials_reserve_memory_and_the_refusal_comes_in_stage_3() -> None:
    from orchestrator.config import CONFIG_DIR, load_config
    from orchestrator.training.tuner import resources_for, trial_gpu_mem_mb

    sa2va = {"name": "sa2va"}
    config = load_config(CONFIG_DIR / "smoke.yaml", {"backend": sa2va, "experiments": ["reward"]})
    roomy = gb.build_plan(
        gpu_inventory.parse_inventory(BOX), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    assert trial_gpu_mem_mb(config, roomy) == footprints.REWARD_NET_TRAIN_MB == 1024
    assert trial_gpu_mem_mb(config, None) == 0  # the CPU backend: nothing to reserve
    # Fine-tuning Sa2VA's head: every GPU-using trial reserves the larger footprint.
    everything = load_config(CONFIG_DIR / "smoke.yaml", {"backend": sa2va})
    assert trial_gpu_mem_mb(everything, roomy) == footprints.SA2VA_HEAD_TRAIN_MB == 2048
    no_reward = load_config(CONFIG_DIR / "smoke.yaml", {"experiments": ["prompt"]})
    assert trial_gpu_mem_mb(no_reward, roomy) == 0
    tight = gb.build_plan(
        gpu_inventory.parse_inventory("24:14"), footprints.FOOTPRINTS["sa2va-4b"], 1024
    )
    with pytest.raises(gb.PlanError, match="reward-net training needs 1024 MB"):
        trial_gpu_mem_mb(config, tight)
    with pytest.raises(gb.PlanError, match="Sa2VA head fine-tuning needs 2048 MB"):
        trial_gpu_mem_mb(everything, tight)
    request = resources_for(0.5, 1024)
    assert request({"trial": "reward_net"}) == {"cpu": 0.5, gb.GPU_MEM_RESOURCE: 1024.0}
    assert request({"trial": "prompt"}) == {"cpu": 0.5}
    assert resources_for(0.5, 0)({"trial": "reward_net"}) == {"cpu": 0.5}
