"""The cluster deployment files, read as data: docker-compose.yml, Dockerfile, .dockerignore and
the commands docs/cluster.md documents.

Docker's engine is not available in CI, so nothing is built or started here. The structure is
asserted instead: the image pinned to the Ray of setup.cfg with the project installed, token auth
on every Ray process with the token from a mounted secret file, ports published on 127.0.0.1
only, GPU reservations, shm, shared volumes at the same paths on every node, healthchecks, and
documented commands that our CLI parses. Where a compose client is installed, it validates the
file too.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCS = REPO / "docs" / "cluster.md"
RAY_SERVICES = ("ray-head", "ray-worker")
SHARED_MOUNTS = {"/data": True, "/models": True, "/results": False, "/cache": False}
"""Container path -> read-only, on every Ray node."""
TOKEN_PATH = "/run/secrets/ray_auth_token"
_INTERPOLATED = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's interpolation with no variables set: ``${X:-default}`` -> default, ``$$`` -> $."""
    if isinstance(value, str):
        return _INTERPOLATED.sub(lambda m: "$" if m.group(0) == "$$" else m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def ray_pin() -> str:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    found = re.search(r"^ray\[[^\]]*\]==([\d.]+)$", parser["options"]["install_requires"], re.M)
    assert found, "setup.cfg pins no ray version"
    return found.group(1)


def published(service: dict[str, Any]) -> list[dict[str, str]]:
    """Published ports as {host_ip, published, target}, from the short or the long syntax."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append({k: str(port.get(k, "")) for k in ("host_ip", "published", "target")})
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        ports.append({"host_ip": host_ip, "published": parts[-2], "target": parts[-1]})
    return ports


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of the short-syntax volumes."""
    found = {}
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        found[target] = (source, mode == ["ro"])
    return found


# --- the image ----------------------------------------------------------------------------------
def test_image_is_the_official_ray_gpu_image_of_the_pinned_version(
    dockerfile: list[tuple[str, str]],
) -> None:
    bases = [args for op, args in dockerfile if op == "FROM"]
    assert bases == [f"rayproject/ray:{ray_pin()}-py311-gpu"]


def test_image_installs_the_project_and_runs_as_the_ray_user(
    dockerfile: list[tuple[str, str]],
) -> None:
    copied = " ".join(args for op, args in dockerfile if op == "COPY")
    for part in ("setup.cfg", "pyproject.toml", "orchestrator", "envs", "models", "tune_configs"):
        assert part in copied
    installs = [args for op, args in dockerfile if op == "RUN" and "pip install" in args]
    assert len(installs) == 1 and re.search(r'pip install .*"?\.\[sa2va\]"?', installs[0])
    users = [args for op, args in dockerfile if op == "USER"]
    assert users[-1] == "ray"


def test_image_turns_token_auth_on_and_holds_no_token(dockerfile: list[tuple[str, str]]) -> None:
    env = " ".join(args for op, args in dockerfile if op == "ENV")
    assert "RAY_AUTH_MODE=token" in env
    assert f"RAY_AUTH_TOKEN_PATH={TOKEN_PATH}" in env
    assert "RAY_AUTH_TOKEN=" not in env
    assert not any("secrets" in args for op, args in dockerfile if op in ("COPY", "ADD"))


def test_build_context_leaves_out_secrets_data_and_outputs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("secrets", "data", "weights", "runs", "results", ".git", ".env"):
        assert ignored(name), name
    for name in ("setup.cfg", "pyproject.toml", "orchestrator", "envs", "models", "tune_configs"):
        assert not ignored(name), name


# --- the services -------------------------------------------------------------------------------
def test_ray_services_build_the_image(compose: dict[str, Any]) -> None:
    for name in RAY_SERVICES:
        service = compose["services"][name]
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert service["image"].endswith(ray_pin())


def test_ports_are_published_on_localhost_only(compose: dict[str, Any]) -> None:
    everything = [p for s in compose["services"].values() for p in published(s)]
    assert everything and all(p["host_ip"] == "127.0.0.1" for p in everything)
    head = {(p["published"], p["target"]) for p in published(compose["services"]["ray-head"])}
    assert head == {("8265", "8265"), ("10001", "10001")}  # dashboard + job API, Ray client
    assert not published(compose["services"]["ray-worker"])
    # The head's processes listen where its published ports lead.
    command = compose["services"]["ray-head"]["command"]
    assert "--dashboard-port=8265" in command and "--ray-client-server-port=10001" in command


def test_token_auth_is_on_with_the_token_from_a_secret_file(compose: dict[str, Any]) -> None:
    secret = compose["secrets"]["ray_auth_token"]
    assert set(secret) == {"file"}
    for name in RAY_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"] == TOKEN_PATH
        assert "RAY_AUTH_TOKEN" not in env  # a value in the environment shows in docker inspect
        assert "ray_auth_token" in service["secrets"]
    assert "disabled" not in COMPOSE.read_text().lower()


def test_gpu_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in compose["services"]["ray-head"]
    assert "--num-gpus=0" in compose["services"]["ray-head"]["command"]


def test_ray_nodes_get_shared_memory_for_the_object_store(compose: dict[str, Any]) -> None:
    for name in RAY_SERVICES:
        size = compose["services"][name]["shm_size"]
        assert re.fullmatch(r"\d+gb", size) and int(size[:-2]) >= 4, (name, size)


def test_every_ray_node_mounts_the_same_shared_volumes(compose: dict[str, Any]) -> None:
    head, worker = (mounts(compose["services"][name]) for name in RAY_SERVICES)
    assert head == worker
    assert {target: ro for target, (_src, ro) in head.items()} == SHARED_MOUNTS
    named = {src for src, _ro in head.values() if not src.startswith((".", "/"))}
    assert named == {"results", "cache"} and named <= set(compose["volumes"])


def test_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in RAY_SERVICES:
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD-SHELL" and "ray " in check["test"][1]
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_worker_node_starts_ray_with_its_gpu_plan(compose: dict[str, Any]) -> None:
    worker = compose["services"]["ray-worker"]
    script = worker["command"][-1]
    plan_line = re.search(r"sa2va-rl (plan [^|]+)\|", script)
    assert plan_line and "--ray-start-args" in plan_line.group(1)
    env = worker["environment"]
    argv = shlex.split(
        plan_line.group(1)
        .replace("${SA2VA_MODEL}", env["SA2VA_MODEL"])
        .replace("${SA2VA_MARGIN_GB}", str(env["SA2VA_MARGIN_GB"]))
    )
    args = build_parser().parse_args(argv)  # our CLI accepts exactly these flags
    assert args.model == "sa2va-4b" and args.ray_start_args
    assert "--address=${RAY_HEAD_ADDRESS} ${RAY_WORKER_ARGS} --block" in script
    assert env["RAY_HEAD_ADDRESS"] == "ray-head:6379" and env["RAY_WORKER_ARGS"] == ""


def test_tensorboard_is_read_only_and_local(compose: dict[str, Any]) -> None:
    board = compose["services"]["tensorboard"]
    assert board["volumes"] == ["results:/results:ro"]
    assert published(board) == [{"host_ip": "127.0.0.1", "published": "6006", "target": "6006"}]


def test_compose_client_accepts_the_file(tmp_path: Path) -> None:
    """``docker compose config`` (or the older ``docker-compose``) where one is installed."""
    client = None
    if shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        client = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        client = ["docker-compose"]
    if client is None:
        pytest.skip("no docker compose client installed")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ray_auth_token").write_text("0" * 64)
    result = subprocess.run(
        [*client, "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- the documented commands --------------------------------------------------------------------
def documented_commands() -> list[str]:
    """Shell commands of docs/cluster.md's code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", DOCS.read_text(), re.S)
    text = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    return [line.strip() for line in text.splitlines() if line.strip()]


def sa2va_rl_args(command: str) -> list[str]:
    argv = shlex.split(command)
    return argv[argv.index("sa2va-rl") + 1 :]


def test_docs_submit_the_full_mode_with_the_token() -> None:
    commands = documented_commands()
    submits = [c for c in commands if "ray job submit" in c and "sa2va-rl run" in c]
    assert submits, "docs/cluster.md documents no `ray job submit ... sa2va-rl run`"
    full = [c for c in submits if "tune_configs/full.yaml" in c]
    assert full
    args = build_parser().parse_args(sa2va_rl_args(full[0]))
    assert args.address == "auto"
    assert args.config == "tune_configs/full.yaml"
    assert args.output.startswith("/results/")
    assert args.cache_dir.startswith("/cache/")
    assert args.model_path.startswith("/models/")
    assert "--address http://127.0.0.1:8265" in full[0]
    # The client side of token auth, the documented way.
    exports = " ".join(c for c in commands if c.startswith("export "))
    assert "RAY_AUTH_MODE=token" in exports and "RAY_AUTH_TOKEN_PATH=" in exports


def test_every_documented_sa2va_rl_run_parses() -> None:
    runs = [c for c in documented_commands() if "sa2va-rl run" in c]
    assert len(runs) >= 4
    for command in runs:
        args = build_parser().parse_args(sa2va_rl_args(command))
        assert args.address == "auto", command  # every documented run joins the cluster
        if not args.output.startswith("/results/"):
            continue
        # On the compose cluster, every path a run uses is one of the shared volumes.
        for path in (args.cache_dir, args.model_path, args.data):
            assert path is None or "/" + path.split("/")[1] in SHARED_MOUNTS, (command, path)
