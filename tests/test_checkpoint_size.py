"""The GPU plan takes a Sa2VA worker's weights from the checkpoint folder, not a declared size.

Fixture folders hold only ``config.json`` and an index or small safetensors files: an
8B-sized checkpoint is declared by its index (``metadata.total_size``) without writing GBs.
Sa2VA-8B in the footprint table: 8299 M parameters, 15830 MB in bfloat16, 2048 MB of
activations at one tile + 128 MB per extra tile, so 19030 MB at 1024 px (10 tiles) and 17878
MB at 256 px (1 tile).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from models.errors import UserError
from models.sa2va.checkpoint_size import loaded_dtype, read_model_weights, read_weights
from orchestrator import cli
from orchestrator.cluster import gpu_plan
from orchestrator.commands.words import CONFIG_WORDS
from orchestrator.config import parse_config
from orchestrator.gpu import budget as gb
from orchestrator.gpu import footprints

PARAMS_8B = 8_299_000_000


def checkpoint(folder: Path, total_size: int, dtype: str | None = "bfloat16") -> Path:
    """A model folder whose index declares ``total_size`` bytes of tensors (shards absent)."""
    folder.mkdir(parents=True)
    config = {"architectures": ["Sa2VAChatModel"], **({"torch_dtype": dtype} if dtype else {})}
    (folder / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": total_size}, "weight_map": {"a": "model-1.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def folder_8b(tmp_path: Path) -> Path:
    return checkpoint(tmp_path / "Sa2VA-8B", PARAMS_8B * 2)


def test_index_total_size_and_dtype_give_the_parameters(tmp_path: Path, folder_8b: Path) -> None:
    weights = read_weights(folder_8b)
    assert weights is not None
    assert (weights.parameters, weights.disk_bytes, weights.disk_dtype) == (
        PARAMS_8B,
        PARAMS_8B * 2,
        "bfloat16",
    )
    assert weights.loaded_bytes("bfloat16") == PARAMS_8B * 2
    assert weights.loaded_bytes("float32") == PARAMS_8B * 4
    # float32 on disk is the same model: half the parameters of its bytes, bf16 once loaded.
    fp32 = read_weights(checkpoint(tmp_path / "fp32", PARAMS_8B * 4, "float32"))
    assert fp32 is not None and fp32.parameters == PARAMS_8B
    assert fp32.loaded_bytes(loaded_dtype("cuda:0")) == PARAMS_8B * 2
    assert loaded_dtype("cpu") == "float32" and loaded_dtype("auto") == "bfloat16"


def test_safetensors_headers_are_counted_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16)}, str(folder / "model-1.safetensors"))
    save_file({"b": torch.zeros(5), "c": torch.zeros(2, 2)}, str(folder / "model-2.safetensors"))
    weights = read_weights(folder)
    assert weights is not None
    assert (weights.parameters, weights.disk_bytes, weights.disk_dtype) == (21, 60, "mixed")
    assert read_weights(tmp_path / "nothing-here") is None


def test_a_damaged_index_is_named(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "broken", 1)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(UserError, match=r"model.safetensors.index.json: cannot read metadata"):
        read_weights(folder)


def test_an_8b_folder_is_planned_at_8b(folder_8b: Path) -> None:
    weights = read_weights(folder_8b)
    assert weights is not None
    footprint = footprints.footprint_for("sa2va", None, checkpoint=weights, dtype="bfloat16")
    assert (footprint.weights_mb, footprint.activation_mb, footprint.per_tile_mb) == (
        15830,
        2048,
        128,
    )
    assert (footprint.worker_mb(1024), footprint.worker_mb(256)) == (19030, 17878)
    assert footprint.name == "sa2va 8.30B (Sa2VA-8B, bfloat16)"
    # Declared consistently: the same plan.
    assert footprints.footprint_for("sa2va", "8B", checkpoint=weights) == footprint


def test_an_8b_folder_declared_4b_is_refused(folder_8b: Path) -> None:
    weights = read_weights(folder_8b)
    assert weights is not None
    with pytest.raises(UserError) as refused:
        footprints.footprint_for("sa2va", "4B", checkpoint=weights)
    message = refused.value.in_words(CONFIG_WORDS)
    assert message.startswith("backend.model_size in the --config file says 4B, but the model")
    assert "holds 8.30 B parameters (15.5 GB in bfloat16 on disk, from model.safetensors" in message
    assert "the size of Sa2VA-8B, 15830 MB of weights in bfloat16" in message
    assert "drop the declared size, or set it to 8B" in message
    with pytest.raises(UserError, match=r"is 12 GB, but the model folder .* 15830 MB of weights"):
        footprints.footprint_for("sa2va", None, model_gb=12, checkpoint=weights)
    assert (
        footprints.footprint_for("sa2va", None, model_gb=20, checkpoint=weights).worker_mb(256)
        == 20480
    )


def run_config(folder: Path, inventory: str, **backend: Any) -> Any:
    return parse_config(
        {
            "backend": {"name": "sa2va", "model_path": str(folder), **backend},
            "gpu": {"inventory": inventory},
        }
    )


def test_the_run_plans_the_folder_not_the_declared_size(folder_8b: Path) -> None:
    """A 16 GB GPU holds Sa2VA-4B (9622 MB + 1024 margin) but not this 8B folder (17878)."""
    with pytest.raises(UserError, match="says 4B, but the model folder"):
        gpu_plan(run_config(folder_8b, "16:0", model_size="4B"), None)
    with pytest.raises(gb.PlanError, match="needs one GPU with 18902 MB free"):
        gpu_plan(run_config(folder_8b, "16:0"), None)
    plan = gpu_plan(run_config(folder_8b, "24:0"), None)
    assert plan is not None
    assert [(g.worker_mb, g.input_cap) for g in plan.workers] == [(19030, 1024)]


def test_plan_command_reads_the_folder(
    folder_8b: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("orchestrator.commands.plan",))
    args = ["plan", "--inventory", "24:0", "--model-path", str(folder_8b)]
    assert cli.main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "sa2va 8.30B (Sa2VA-8B, bfloat16)"
    assert plan["nodes"][0]["gpus"][0]["worker_mb"] == 19030
    assert cli.main([*args, "--model", "sa2va-4b"]) == cli.EXIT_USER_ERROR
    assert "sa2va-rl plan: error: --model says 4b, but the model folder" in capsys.readouterr().err


def test_a_hub_ids_cached_snapshot_is_read(
    folder_8b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    asked: list[tuple[str, str, str | None]] = []

    def cached(repo_id: str, filename: str, revision: str | None = None) -> str | None:
        asked.append((repo_id, filename, revision))
        return str(folder_8b / filename) if revision == "c" * 40 else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    weights = read_model_weights("ByteDance/Sa2VA-8B", "c" * 40)
    assert weights is not None and weights.parameters == PARAMS_8B
    assert read_model_weights("ByteDance/Sa2VA-8B", "d" * 40) is None
    assert asked[0] == ("ByteDance/Sa2VA-8B", "config.json", "c" * 40)
