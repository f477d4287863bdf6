"""``ray job submit`` against a ``ray start --head`` on this machine, with token auth on.

The head is started the way docs/cluster.md tells (dashboard on 127.0.0.1, ``RAY_AUTH_MODE=token``,
the token in a file named by ``RAY_AUTH_TOKEN_PATH``) on free ports and a temp dir of its own, so
it neither meets nor stops any other Ray on the machine. The client gets the token the documented
way (the same two environment variables); without it, or with another token, the job API refuses.
The smoke run is submitted with ``--working-dir`` (the repository, .gitignore'd files left out),
must end SUCCEEDED with all trials TERMINATED, and the token must appear in no log or output.

The head is stopped by signalling the ``ray start --block`` process group this test started (and
any leftover process of its temp dir, by pid): ``ray stop`` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 300
SUBMISSION_ID = "sa2va-rl-smoke"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Head:
    """A running ``ray start --head``: its job API address, token and client environment."""

    address: str
    token: str
    client_env: dict[str, str]
    temp_dir: Path


def client_env(token_file: Path | None) -> dict[str, str]:
    """This process's environment with the documented token settings (or none at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    if token_file is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    return env


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def wait_for_job_api(head_process: subprocess.Popen[bytes], url: str, token: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert head_process.poll() is None, "ray start --head exited; see head.log"
        try:
            if http_status(f"{url}/api/version", token) == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(1)
    raise AssertionError("the Ray dashboard did not answer within 120 s; see head.log")


def stop_jobs(address: str, token: str) -> None:
    """Stop jobs still running (a failed test), so no driver outlives the head."""
    try:
        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        running = [
            j.submission_id
            for j in client.list_jobs()
            if j.submission_id and not j.status.is_terminal()
        ]
        for submission_id in running:
            client.stop_job(submission_id)
        deadline = time.monotonic() + 30
        while running and time.monotonic() < deadline:
            time.sleep(1)
            running = [i for i in running if not client.get_job_status(i).is_terminal()]
    except Exception as err:  # the head may be gone already; stopping it ends the rest
        print(f"stopping jobs: {err}")


def stop_head(process: subprocess.Popen[bytes], temp_dir: Path) -> None:
    """Stop the Ray processes this test started: its process group, then stragglers by pid."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    marker = str(temp_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone already, or not ours to read


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="sa2va-js-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    dashboard_port = free_port()
    env = client_env(token_file)
    env.update(DASHBOARD_METRIC_PORT=str(free_port()), AUTOSCALER_METRIC_PORT=str(free_port()))
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    with (temp_dir / "head.log").open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_job_api(process, address, token)
        yield Head(address, token, client_env(token_file), temp_dir)
    finally:
        stop_jobs(address, token)
        stop_head(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_api_refuses_clients_without_the_token(head: Head) -> None:
    assert http_status(f"{head.address}/api/version", None) == 401
    assert http_status(f"{head.address}/api/version", secrets.token_hex(32)) == 403
    assert http_status(f"{head.address}/api/version", head.token) == 200
    listing = subprocess.run(
        ["ray", "job", "list", f"--address={head.address}"],
        env=client_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode != 0
    assert "Authentication required" in listing.stdout + listing.stderr


def test_submitted_smoke_run_succeeds(head: Head, tmp_path: Path) -> None:
    output = tmp_path / "run"
    submit = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            f"--address={head.address}",
            f"--submission-id={SUBMISSION_ID}",
            f"--working-dir={REPO}",
            "--",
            "sa2va-rl",
            "run",
            "--address",
            "auto",
            "--config",
            "tune_configs/smoke.yaml",
            "--output",
            str(output),
            "--cache-dir",
            str(tmp_path / "cache"),
            # One experiment: the submission path is the point; the others add minutes.
            "--experiment",
            "prompt",
        ],
        env=head.client_env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    logs = client.get_job_logs(SUBMISSION_ID)
    assert client.get_job_status(SUBMISSION_ID) == JobStatus.SUCCEEDED, logs[-3000:]
    assert submit.returncode == 0, submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["mode"] == "smoke"
    assert set(summary["trials"].values()) == {"TERMINATED"}
    assert f"run directory: {output}" in logs
    # Nothing secret in what the job printed or wrote.
    assert head.token not in submit.stdout + submit.stderr + logs
    assert not files_containing(output, head.token)
    # Nor in anything Ray wrote for the cluster: its logs, job logs, uploaded working dir.
    assert files_containing(head.temp_dir, head.token) == [head.temp_dir / "auth_token"]


def files_containing(folder: Path, text: str) -> list[Path]:
    return [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not path.is_symlink()
        and path.stat().st_size < 50_000_000
        and text.encode() in path.read_bytes()
    ]
