"""What a user installs: the configs ship in the wheel, the defaults follow the config, and the
README says what the package requires."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from orchestrator.config import CONFIG_DIR
from orchestrator.pipeline import RunOptions, default_output

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("base.yaml", "full.yaml", "quick.yaml", "smoke.yaml")


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the checkout (the build writes build/ and egg-info next to it)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("orchestrator", "envs", "models", "tune_configs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    built = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    )
    return tmp_path / "dist" / built.stdout.strip().splitlines()[-1]


def test_a_plain_install_finds_the_shipped_configs(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"orchestrator/tune_configs/{name}" for name in SHIPPED} <= names
        archive.extractall(tmp_path / "site")
    # The installed package, imported from elsewhere, resolves CONFIG_DIR inside itself and
    # loads the default run's config (which extends base.yaml).
    probe = (
        "import orchestrator.config as c; print(c.__file__); print(c.CONFIG_DIR.resolve()); "
        "print(c.load_config(c.CONFIG_DIR / 'quick.yaml').mode)"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert found[0] == str(tmp_path / "site" / "orchestrator" / "config.py")
    assert found[1] == str(tmp_path / "site" / "orchestrator" / "tune_configs")
    assert found[2] == "quick"


def test_the_checkout_links_the_same_configs() -> None:
    assert CONFIG_DIR == ROOT / "orchestrator" / "tune_configs"
    assert CONFIG_DIR.resolve() == ROOT / "tune_configs"
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == list(SHIPPED)


def test_output_defaults_to_the_mode_of_the_config() -> None:
    assert default_output(RunOptions()) == "runs/quick"
    assert default_output(RunOptions(config=str(CONFIG_DIR / "smoke.yaml"))) == "runs/smoke"
    assert default_output(RunOptions(config="tune_configs/full.yaml")) == "runs/full"


def test_setup_cfg_and_readme_agree_on_python_and_torch() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["options"]["python_requires"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in setup["metadata"]["classifiers"]
    readme = (ROOT / "README.md").read_text()
    assert "Python 3.11" in readme and "3.10" not in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "picks the CPU build" not in readme
