"""Which Sa2VA checkpoints load here, and the refusals (with their message text) of everything
that would otherwise fail inside the model: generation vs transformers, missing or broken
packages, devices, dtypes, and the Qwen processor. Uses the tiny v2, Qwen and v1 fixtures."""

from __future__ import annotations

import configparser
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import ray
import torch
import transformers
import yaml
from test_sa2va_backend import PROMPT, stripe_image, stripe_mask
from tiny_sa2va import write_tiny_sa2va

from models.errors import UserError
from models.sa2va import (
    V1,
    V2_INTERNVL,
    V2_QWEN,
    Sa2VASegmenter,
    devices,
    loading,
    preflight,
    segmenter,
)
from models.sa2va import generations as gen
from models.sa2va.source import ModelSource
from orchestrator import cluster
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = transformers.__version__


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("generations")
    return {v: write_tiny_sa2va(base / f"tiny_sa2va_{v}", variant=v) for v in ("v2", "qwen", "v1")}


# --- detection and the pinned transformers ------------------------------------------------------
def test_generation_is_read_from_the_folder(folders: dict[str, Path]) -> None:
    found = {v: gen.inspect_folder(f) for v, f in folders.items()}
    assert found["v2"].generation is V2_INTERNVL and found["v2"].accepts_processor
    assert found["qwen"].generation is V2_QWEN and found["qwen"].model_class == "Sa2VAChatModelQwen"
    assert found["v1"].generation is V1 and not found["v1"].accepts_processor
    assert found["v1"].where == "Sa2VAChatModel in modeling_sa2va_chat.py"


def test_only_the_v1_fixture_config_needs_arguments() -> None:
    from tiny_sa2va.configuration_sa2va_chat import Sa2VAChatConfig
    from tiny_sa2va.configuration_sa2va_chat_qwen import Sa2VAChatConfigQwen
    from tiny_sa2va.configuration_sa2va_chat_v1 import Sa2VAChatConfig as V1Config

    assert Sa2VAChatConfig().llm_config == {"architectures": ["TinyLM"]}
    assert Sa2VAChatConfigQwen().llm_config == {"architectures": ["TinyQwenLM"]}
    with pytest.raises(KeyError, match="architectures"):
        V1Config()


def test_installed_transformers_is_the_range_setup_cfg_pins() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requires = parser["options"]["install_requires"]
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    pins = [Requirement(line) for line in requires.splitlines() if line.startswith("transformers")]
    assert [r.specifier for r in pins] == [SpecifierSet(gen.PROJECT_TRANSFORMERS)]
    assert V2_INTERNVL.accepts(INSTALLED) and V2_QWEN.accepts(INSTALLED)
    assert not V2_INTERNVL.accepts("5.0.0") and not V2_INTERNVL.accepts("4.56.2")
    assert V1.accepts("4.51.3") and not V1.accepts("4.52.0")


def test_every_package_the_messages_attribute_to_the_extra_is_in_it() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    extra = parser["options.extras_require"]["sa2va"].split()
    names = {line.split(">")[0].split("=")[0].split("<")[0] for line in extra}
    assert set(gen.EXTRA_PACKAGES.values()) == names


def test_v2_and_qwen_load_under_the_pinned_transformers(folders: dict[str, Path]) -> None:
    assert preflight(folders["v2"], device="cpu").generation is V2_INTERNVL  # type: ignore[union-attr]
    assert preflight(folders["qwen"], device="cpu").generation is V2_QWEN  # type: ignore[union-attr]


def test_v1_is_refused_with_generation_version_range_and_command(folders: dict[str, Path]) -> None:
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(folders["v1"], device="cpu")
    assert str(error.value) == (
        f"Sa2VA model {folders['v1'].resolve()}: Sa2VA v1 remote code (magic-research/Sa2VA, "
        "Sa2VAChatModel whose config class cannot be built without arguments) (Sa2VAChatModel "
        "in modeling_sa2va_chat.py) needs transformers >=4.49,<4.52; this environment has "
        f"transformers {INSTALLED} (outside that range). Run `pip install "
        '"transformers==4.51.3"`. sa2va-rl pins transformers>=4.57,<5 for the current (v2) '
        "checkpoints, so give the segmentation workers an environment of their own (run "
        'config: backend.runtime_env: {pip: ["transformers==4.51.3"]}), or run from a '
        "virtualenv where you install that transformers after sa2va-rl, or use a v2 checkpoint "
        "(ByteDance/Sa2VA-*)."
    )


def test_v1_really_fails_on_this_transformers_and_the_key_error_is_translated(
    folders: dict[str, Path],
) -> None:
    # Past the preflight, transformers builds the v1 config class bare and fails as upstream.
    source = ModelSource.resolve(folders["v1"], None, False)
    checkpoint = gen.inspect_folder(folders["v1"])
    with pytest.raises(UserError) as error:
        loading.load_model(source, checkpoint, torch.float32, torch.device("cpu"))
    message = str(error.value)
    assert "Loading failed with KeyError: 'architectures'." in message
    assert "Sa2VA v1 remote code" in message and "needs transformers >=4.49,<4.52" in message
    assert f"has transformers {INSTALLED}" in message
    assert 'Run `pip install "transformers==4.51.3"`' in message


def test_v2_under_transformers_5_is_refused_before_loading(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gen, "installed_transformers", lambda: "5.24.0")
    with pytest.raises(UserError) as error:
        preflight(folders["v2"], device="cpu")
    assert (
        "Sa2VA v2 InternVL-based remote code (bytedance/Sa2VA, Sa2VAChatModel) "
        "(Sa2VAChatModel in modeling_sa2va_chat.py) needs transformers >=4.57,<5; this "
        "environment has transformers 5.24.0 (outside that range). Run `pip install "
        '"transformers>=4.57,<5"`.'
    ) in str(error.value)


def test_import_error_from_transformers_is_a_version_mismatch(tmp_path: Path) -> None:
    # As 5.x removed transformers.modeling_attn_mask_utils, which v2 code imports.
    folder = write_tiny_sa2va(
        tmp_path / "tiny_sa2va_gone",
        extra_code="from transformers.modeling_attn_mask_utils_gone import helper",
    )
    source = ModelSource.resolve(folder, None, False)
    with pytest.raises(UserError) as error:
        loading.load_model(source, gen.inspect_folder(folder), torch.float32, torch.device("cpu"))
    message = str(error.value)
    assert "Loading failed with ModuleNotFoundError: No module named " in message
    assert "needs transformers >=4.57,<5" in message and "Sa2VA v2 InternVL-based" in message
    assert "[sa2va]" not in message  # not the wrong advice


def test_attribute_error_while_loading_is_a_version_mismatch(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def as_in_5x(*args: Any, **kwargs: Any) -> None:
        raise AttributeError("'Sa2VAChatModel' object has no attribute 'all_tied_weights_keys'")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", as_in_5x)
    source = ModelSource.resolve(folders["v2"], None, False)
    with pytest.raises(UserError, match=r"needs transformers >=4\.57,<5") as error:
        loading.load_model(
            source, gen.inspect_folder(folders["v2"]), torch.float32, torch.device("cpu")
        )
    assert "AttributeError: 'Sa2VAChatModel' object has no attribute 'all_tied" in str(error.value)


# --- packages -----------------------------------------------------------------------------------
def test_missing_package_outside_the_extra_is_named_with_its_pip_command(tmp_path: Path) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_needs", extra_code="import sa2va_rl_absent")
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(folder, device="cpu")
    assert str(error.value) == (
        f"Sa2VA's remote code in {folder.resolve()} needs the Python package(s) sa2va_rl_absent, "
        "which are not installed. sa2va_rl_absent is not part of that extra: "
        "`pip install sa2va_rl_absent`."
    )


def test_missing_package_of_the_extra_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_extra", extra_code="import sa2va_rl_absent")
    monkeypatch.setitem(gen.EXTRA_PACKAGES, "sa2va_rl_absent", "sa2va-rl-absent")
    with pytest.raises(UserError) as error:
        preflight(folder, device="cpu")
    assert (
        "needs the Python package(s) sa2va_rl_absent, which are not installed. sa2va-rl-absent "
        'come(s) with sa2va-rl\'s `sa2va` extra: run `pip install -e ".[sa2va]"` in the '
        "sa2va-rl checkout"
    ) in str(error.value)


def test_missing_package_reported_by_transformers_at_load_names_it(tmp_path: Path) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_late", extra_code="import sa2va_rl_absent")
    source = ModelSource.resolve(folder, None, False)
    with pytest.raises(UserError, match=r"needs the Python package\(s\) sa2va_rl_absent, which"):
        loading.load_model(source, None, torch.float32, torch.device("cpu"))


def test_guarded_imports_are_optional(tmp_path: Path) -> None:
    code = "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None"
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_guarded", extra_code=code)
    assert "flash_attn" not in gen.inspect_folder(folder).imports


def test_torchvision_built_for_another_torch_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(gen.metadata, "version", lambda name: "0.28.0")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError) as error:
        gen.check_torchvision()
    assert str(error.value) == (
        "torchvision 0.28.0 is installed but cannot be imported with torch 2.13.0+cpu "
        "(RuntimeError: operator torchvision::nms does not exist). torchvision must be built "
        "for the same torch (torch 2.13 -> torchvision 0.28.*). This torch is a CPU-only build "
        'and PyPI\'s torchvision wheels are CUDA builds: `pip install "torchvision==0.28.*" '
        "--index-url https://download.pytorch.org/whl/cpu`."
    )
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(UserError, match="from the index your torch came from"):
        gen.check_torchvision()


# --- devices and dtypes -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_no_cuda_is_refused_and_auto_never_falls_back(
    folders: dict[str, Path], device: str
) -> None:
    with pytest.raises(UserError) as error:
        preflight(folders["v2"], device=device)
    message = str(error.value)
    assert message.startswith(f"Sa2VA needs a CUDA GPU, and device {device!r} found none")
    assert "'auto' never falls back to the CPU" in message
    assert "set backend.device: cpu explicitly to debug" in message


def test_explicit_cpu_is_allowed_with_a_warning(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="models.sa2va.devices"):
        assert devices.resolve_device("cpu") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [devices.CPU_WARNING]


def test_cpu_is_refused_for_code_that_hard_codes_cuda(tmp_path: Path) -> None:
    code = "def _to_gpu(ids):\n    return ids.cuda()  # as upstream predict_forward"
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va_cuda", extra_code=code)
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(folder, device="cpu")
    assert str(error.value) == (
        f"Sa2VA model folder '{folder.resolve()}' cannot run on device 'cpu': its remote code "
        "hard-codes CUDA (modeling_sa2va_chat.py:2). Run it on a CUDA GPU (backend.device: "
        "auto or cuda:N)."
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu_is_refused(folders: dict[str, Path], dtype: str) -> None:
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(folders["v2"], device="cpu", dtype=dtype)
    assert str(error.value) == (
        f"Sa2VA dtype {dtype!r} runs only on CUDA (its SAM2 path relies on CUDA autocast); on "
        "device 'cpu' use dtype 'float32' (the default there)"
    )


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch.cuda as on a machine with two GPUs; returns the set_device calls."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_cuda_n_is_that_device_and_becomes_current(two_gpus: list[int]) -> None:
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_dtype(None, torch.device("cuda", 1)) == torch.bfloat16
    with devices.use_device(torch.device("cuda", 1)):
        assert two_gpus == [1]
    assert two_gpus == [1, 0]
    with pytest.raises(UserError, match=r"device 'cuda:2': only 2 CUDA device\(s\) are visible"):
        devices.resolve_device("cuda:2")


def test_loading_and_every_call_run_on_the_selected_device(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: list[torch.device] = []

    @contextmanager
    def recording(device: torch.device) -> Iterator[None]:
        entered.append(device)
        yield

    monkeypatch.setattr(segmenter, "use_device", recording)
    seg = Sa2VASegmenter(folders["v2"], device="cpu")
    seg.segment(stripe_image(), PROMPT)
    seg.segment(stripe_image(), PROMPT)
    assert entered == [torch.device("cpu")] * 3


# --- the Qwen processor -------------------------------------------------------------------------
def test_qwen_without_a_processor_is_refused(folders: dict[str, Path]) -> None:
    # With no processor files AutoProcessor falls back to the tokenizer, which Qwen cannot use.
    with pytest.raises(UserError) as error:
        Sa2VASegmenter(folders["qwen"], device="cpu")
    assert str(error.value).startswith(
        f"Sa2VA folder '{folders['qwen'].resolve()}' is Qwen-VL-based and needs a processor with "
        "a tokenizer and an image processor; AutoProcessor.from_pretrained returned a "
        "TinySa2VATokenizer without tokenizer and image_processor"
    )


def test_qwen_gets_the_loaded_processor_and_keeps_its_dtype(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = SimpleNamespace(tokenizer=object(), image_processor=object())
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    seg = Sa2VASegmenter(folders["qwen"], device="cpu")
    result = seg.segment(stripe_image(), PROMPT)
    assert seg.model.last_processor is processor
    # Grounding inputs follow model.torch_dtype (bfloat16 in the remote code) unless prepared.
    assert seg.model.torch_dtype == torch.float32
    np.testing.assert_array_equal(result.mask, stripe_mask())
    assert result.score is not None and result.flags == ()


def test_given_processor_without_image_processor_is_refused(folders: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="processor= is a SimpleNamespace without image_processor"):
        Sa2VASegmenter(folders["qwen"], device="cpu", processor=SimpleNamespace(tokenizer=1))


def test_processor_is_passed_only_where_predict_forward_takes_it(
    folders: dict[str, Path],
) -> None:
    class V1Like:
        def predict_forward(self, image=None, video=None, text=None, past_text="",
                            mask_prompts=None, tokenizer=None):  # fmt: skip
            return {}

    class V2Like:
        def predict_forward(self, image=None, text=None, tokenizer=None, processor=None):
            return {}

    assert not loading.accepts_processor(V1Like()) and loading.accepts_processor(V2Like())
    # The InternVL-based v2 takes processor= but needs none: none is loaded or passed.
    seg = Sa2VASegmenter(folders["v2"], device="cpu")
    assert seg._processor is None


# --- before any worker starts -------------------------------------------------------------------
def run_config(folder: Path, tmp_path: Path, **backend: Any) -> Any:
    path = tmp_path / "config.yaml"
    backend = {"name": "sa2va", "model_path": str(folder), **backend}
    path.write_text(yaml.safe_dump({"extends": str(ROOT / "tune_configs/smoke.yaml"),
                                    "backend": backend}))  # fmt: skip
    return load_config(str(path))


def test_run_refuses_a_v1_checkpoint_before_ray(folders: dict[str, Path], tmp_path: Path) -> None:
    config = run_config(folders["v1"], tmp_path, device="cpu")
    with pytest.raises(UserError) as error:
        cluster.check_model_source(config)
    message = str(error.value)
    assert "Sa2VA v1 remote code" in message and f"transformers {INSTALLED}" in message
    assert message.endswith(
        "(Run config keys: backend.model_path or --model-path, backend.revision, "
        "backend.device, backend.allow_unpinned_remote_code.)"
    )
    assert not ray.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_refuses_auto_without_cuda_unless_joining_a_cluster(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = run_config(folders["v2"], tmp_path)
    assert config.backend.device == "auto"
    with pytest.raises(UserError, match="Sa2VA needs a CUDA GPU, and device 'auto' found none"):
        cluster.check_model_source(config)
    # The driver of a cluster run may sit on a node without GPUs: the workers check the device.
    # Their CUDA loads go straight to the GPU (device_map), which needs accelerate.
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(UserError, match=r"needs the Python package\(s\) accelerate"):
            cluster.check_model_source(config, local=False)
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: find_spec("os" if name == "accelerate" else name, *a),
        )
    cluster.check_model_source(config, local=False)
    cluster.check_model_source(run_config(folders["v2"], tmp_path, device="cpu"))


# --- the workers' own runtime_env ---------------------------------------------------------------
def test_with_a_runtime_env_the_driver_leaves_the_environment_to_the_workers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    runtime_env = {"pip": ["transformers==4.51.3"]}
    config = run_config(folders["v1"], tmp_path, device="cpu", runtime_env=runtime_env)
    cluster.check_model_source(config)  # the v1 code is read, its transformers not checked here
    assert preflight(folders["v1"], device="cpu", environment=False).generation is V1  # type: ignore[union-attr]
    # A folder that is no Sa2VA checkpoint is still refused on the driver.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"has no auto_map\.AutoModel"):
        cluster.check_model_source(
            run_config(tmp_path / "other", tmp_path, device="cpu", runtime_env=runtime_env)
        )


@pytest.mark.slow
def test_segmentation_workers_run_in_the_backend_runtime_env(tmp_path: Path) -> None:
    from orchestrator.inference.pool import NAMESPACE, shutdown_workers
    from orchestrator.run_id import new_run_id

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "extends": str(ROOT / "tune_configs/smoke.yaml"),
        "backend": {"name": "frangi", "runtime_env": {"env_vars": {"SA2VA_RL_PROBE": "own"}}},
        "workers": {"cache_dir": str(tmp_path / "cache"), "cpu_workers": 1},
    }))  # fmt: skip
    config = load_config(str(path))
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        names = cluster.start_segmentation_workers(config, None, new_run_id())
        worker = ray.get_actor(names[0], namespace=NAMESPACE)
        probe = worker.__ray_call__.remote(lambda self: os.environ.get("SA2VA_RL_PROBE"))
        assert ray.get(probe) == "own"
        assert "SA2VA_RL_PROBE" not in os.environ  # only the workers' environment has it
        shutdown_workers(names)
    finally:
        ray.shutdown()
