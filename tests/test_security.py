"""Safe defaults: local Ray on localhost with token auth, pinned remote code, pickle-free loads.

- A local run's dashboard/job API (which runs arbitrary code for whoever reaches it) binds
  127.0.0.1, and the local Ray has token authentication on; nothing in the project turns it off.
- ``trust_remote_code`` runs only code from a local folder or a Hub id pinned to a commit: an
  unpinned Hub id is refused by ``sa2va-rl run`` with exit code 2 before Ray starts, unless the
  config says ``backend.allow_unpinned_remote_code: true``.
- Reward-net checkpoints and exported policies load with ``weights_only=True``: a file carrying
  pickled objects (here a ``__reduce__`` payload that would create a file when unpickled) is
  refused with a UserError and its code never runs.
- Our code never reads the auth token, so it cannot print it (the job-submit test checks the logs
  and outputs of a real submitted run for it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_sa2va import write_tiny_sa2va

from models.errors import UserError
from models.reward_net import RewardNet, load_checkpoint, save_checkpoint
from orchestrator import cluster, pipeline
from orchestrator.cli import EXIT_USER_ERROR, main
from orchestrator.config import CONFIG_DIR, load_config
from orchestrator.training.ppo import ExportedPolicy

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("orchestrator", "envs", "models", "benchmarks")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def project_files(*names: str) -> list[Path]:
    """Python files of the given top-level folders plus the named files, as they ship."""
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    return files + [REPO / n for n in names if (REPO / n).is_file()]


# --- local Ray: localhost, token auth ------------------------------------------------------------
def test_local_ray_is_asked_for_a_localhost_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    cluster.start_ray(pipeline.RunOptions(num_cpus=1), None)
    cluster.start_ray(pipeline.RunOptions(address="auto"), None)
    local, joined = calls
    assert local["dashboard_host"] == "127.0.0.1"
    assert "0.0.0.0" not in repr(local) and "_node_ip_address" not in local
    assert joined["address"] == "auto" and "dashboard_host" not in joined


def test_local_ray_starts_with_token_auth_and_a_loopback_dashboard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # Ray's own default, whatever ran before
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    cluster.start_ray(pipeline.RunOptions(num_cpus=1, dashboard=True), None)
    try:
        assert is_token_auth_enabled()
        # Ray keeps no public accessor for this; the URL is what the dashboard bound to.
        dashboard = ray._private.worker.get_dashboard_url()
        assert dashboard.split(":")[0] == "127.0.0.1"
    finally:
        ray.shutdown()


def test_nothing_disables_token_auth_or_binds_all_interfaces() -> None:
    disabling = re.compile(r"RAY_AUTH_MODE[\"']?\s*[:=,]\s*[\"']?disabled", re.IGNORECASE)
    for path in project_files("Dockerfile", "docker-compose.yml", "setup.cfg", ".ci/run"):
        text = path.read_text()
        assert not disabling.search(text), path
        if path.suffix == ".py":
            assert "0.0.0.0" not in text, path


def code_words(path: Path) -> list[str]:
    """Names, attributes and string constants of a Python file, docstrings left out (they may
    tell users about the token; code must not touch it)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.append(node.value)
    return words


def test_project_code_never_reads_the_auth_token() -> None:
    token_access = re.compile(r"auth_token|RAY_AUTH_TOKEN|get_raw_token|authorization", re.I)
    for path in project_files():
        assert not [w for w in code_words(path) if token_access.search(w)], path


# --- trust_remote_code only for pinned sources ---------------------------------------------------
def test_unpinned_hub_id_is_refused_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    output = tmp_path / "run"
    args = ["run", "--config", str(CONFIG_DIR / "smoke.yaml"), "--output", str(output)]
    code = main([*args, "--backend", "sa2va", "--model-path", "ByteDance/Sa2VA-4B"])
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    assert "'ByteDance/Sa2VA-4B' is a Hugging Face Hub id without a pinned revision" in captured.err
    assert "backend.revision" in captured.err
    assert "backend.allow_unpinned_remote_code" in captured.err
    # Refused in the config stage: no data, no Ray, not even a run directory.
    assert "[2/7]" not in captured.out
    assert not ray.is_initialized()
    assert not output.exists()


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"model_path": "ByteDance/Sa2VA-4B", "revision": "main"}, "not a 40-hex commit id"),
        ({"model_path": "missing/folder/Sa2VA-4B"}, "does not exist"),
        ({}, "backend sa2va needs a model"),
    ],
)
def test_other_bad_model_sources_are_refused_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, {"name": "sa2va", **backend})
    with pytest.raises(UserError, match=message):
        cluster.check_model_source(config)


@pytest.mark.parametrize(
    "backend",
    [
        {"model_path": "ByteDance/Sa2VA-4B", "revision": COMMIT},
        {"model_path": "ByteDance/Sa2VA-4B", "allow_unpinned_remote_code": True},
        {"model_path": "TINY"},
        {"name": "frangi"},
    ],
)
def test_pinned_local_or_explicitly_allowed_sources_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    if backend.get("model_path") == "TINY":
        backend = {"model_path": str(write_tiny_sa2va(tmp_path / "tiny_sa2va_v2"))}
    # device cpu: this test is about the source; the device rules are in test_sa2va_generations.
    config = write_config(tmp_path, {"name": "sa2va", "device": "cpu", **backend})
    cluster.check_model_source(config)


def write_config(folder: Path, backend: dict[str, Any]) -> Any:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"extends": str(CONFIG_DIR / "smoke.yaml"), "backend": backend}))
    return load_config(str(path))


# --- checkpoints load without unpickling code ----------------------------------------------------
class CreatesFile:
    """Unpickling this object calls ``open(path, "w")``: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


class Opaque:
    """A plain custom class: loading it needs the class, i.e. unpickling code."""


def reward_net_payload(extra: Any) -> dict[str, Any]:
    return {
        "state_dict": RewardNet().state_dict(),
        "metadata": {"version": 1, "input_size": 64, "extra": extra},
    }


def policy_payload(extra: Any) -> dict[str, Any]:
    state = {"pi.net.mlp.0.weight": torch.zeros(3, 4), "pi.net.mlp.0.bias": torch.zeros(3)}
    return {"state_dict": state, "metadata": {"version": 1, "extra": extra}}


LOADERS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[Path], Any], str]] = {
    "reward_net": (reward_net_payload, load_checkpoint, "reward-net checkpoint"),
    "policy": (policy_payload, ExportedPolicy.load, "policy file"),
}


def test_the_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    """The malicious file below is real: a plain ``torch.load`` executes it."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save(reward_net_payload(CreatesFile(marker)), path)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_checkpoint_with_code_is_refused_without_running_it(tmp_path: Path, kind: str) -> None:
    make_payload, load, what = LOADERS[kind]
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save(make_payload(CreatesFile(marker)), path)
    with pytest.raises(UserError, match=re.escape(f"{what} {path}")):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_checkpoint_with_a_custom_class_is_refused(tmp_path: Path, kind: str) -> None:
    make_payload, load, what = LOADERS[kind]
    path = tmp_path / "opaque.pt"
    torch.save(make_payload(Opaque()), path)
    with pytest.raises(UserError, match=re.escape(f"{what} {path}")):
        load(path)


def test_plain_checkpoints_still_load(tmp_path: Path) -> None:
    net = save_checkpoint(tmp_path / "net.pt", RewardNet(), {"input_size": 64})
    assert load_checkpoint(net).input_size == 64
    policy = tmp_path / "policy.pt"
    torch.save(policy_payload("plain"), policy)
    assert ExportedPolicy.load(policy).act(torch.zeros(4).numpy()) == 0
