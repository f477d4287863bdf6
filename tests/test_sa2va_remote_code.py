"""Remote code loads safely in parallel and is never shared between checkpoints: two folders with
the same name get their own code in one process and in two, and transformers copies code only
while the inter-process lock is held."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import transformers.dynamic_module_utils as dynamic
from filelock import FileLock, Timeout
from test_sa2va_backend import PROMPT, stripe_image
from tiny_sa2va import write_tiny_sa2va

from models.sa2va import Sa2VASegmenter, loading, remote_code
from models.sa2va.source import ModelSource

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def twin_folders(base: Path) -> dict[str, Path]:
    """``a/tiny_sa2va`` and ``b/tiny_sa2va``: same name, each sam2.py marked with its letter,
    b's also shifting every candidate mask (so b's own code gives another answer)."""
    folders = {}
    for letter, shift in (("a", ""), ("b", "CANDIDATE_OFFSETS = (4.0, 5.0, 6.0)\n")):
        folder = write_tiny_sa2va(base / letter / "tiny_sa2va")
        sam2 = folder / "sam2.py"
        text = sam2.read_text().replace("\n\nclass ImageEncoder", f"\n{shift}\nclass ImageEncoder")
        sam2.write_text(text + f'\nCODE_MARK = "{letter}"\n')
        folders[letter] = folder
    return folders


def sam2_module(seg: Sa2VASegmenter) -> Any:
    return sys.modules[type(seg.model.grounding_encoder).__module__]


def test_same_named_folders_keep_their_own_code_in_one_process(tmp_path: Path) -> None:
    folders = twin_folders(tmp_path)
    a = Sa2VASegmenter(folders["a"], device="cpu")
    b = Sa2VASegmenter(folders["b"], device="cpu")
    assert (sam2_module(a).CODE_MARK, sam2_module(b).CODE_MARK) == ("a", "b")
    assert sam2_module(a) is not sam2_module(b)
    # b's own offsets make every pixel "vessel"; a's code finds the stripe only.
    assert b.segment(stripe_image(), PROMPT).mask.all()
    assert a.segment(stripe_image(), PROMPT).mask.mean() == pytest.approx(0.25)
    links = {Path(remote_code.code_location(s._source)) for s in (a, b)}
    assert len(links) == 2 and {p.resolve() for p in links} == set(folders.values())


def test_changed_code_gets_a_new_module_directory(tmp_path: Path) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va")
    source = Sa2VASegmenter(folder, device="cpu")._source
    before = remote_code.code_location(source)
    (folder / "sam2.py").write_text((folder / "sam2.py").read_text() + "\n# edited\n")
    assert remote_code.code_location(source) != before
    assert remote_code.code_location(source) == remote_code.code_location(source)


def test_transformers_copies_code_only_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va")
    copies: list[bool] = []
    original = dynamic.get_cached_module_file

    def recording(path: Any, module_file: str, **kwargs: Any) -> Any:
        target = Path(dynamic.HF_MODULES_CACHE) / "transformers_modules" / Path(path).name
        before = (target / module_file).exists()
        result = original(path, module_file, **kwargs)
        if not before:
            copies.append(is_held(str(path)))
        return result

    monkeypatch.setattr(dynamic, "get_cached_module_file", recording)
    Sa2VASegmenter(folder, device="cpu")
    assert copies and all(copies)  # config, modeling (+ sam2, tiny_lm), tokenizer code


def is_held(location: str) -> bool:
    """Whether another holder has the lock of ``location`` (a new lock object cannot take it)."""
    probe = FileLock(str(remote_code.links_root() / remote_code.lock_name(location)), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


LOAD = """
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import numpy as np
from models.sa2va import Sa2VASegmenter
from test_sa2va_backend import PROMPT, stripe_image
Path(sys.argv[2]).touch()
while len(list(Path(sys.argv[2]).parent.glob("ready-*"))) < 2:
    pass
mask = Sa2VASegmenter(sys.argv[1], device="cpu").segment(stripe_image(), PROMPT).mask
print(round(float(mask.mean()), 4))
"""


@pytest.mark.slow
def test_two_processes_load_same_named_folders_at_once(tmp_path: Path) -> None:
    folders = twin_folders(tmp_path)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, str(folders[letter]), str(tmp_path / f"ready-{letter}")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for letter in "ab"
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.split()[-1] for out, _ in outputs] == ["0.25", "1.0"]


@pytest.mark.parametrize(
    ("device", "placement"),
    [(torch.device("cuda", 1), {"device_map": {"": torch.device("cuda", 1)}}), (CPU, {})],
)
def test_weights_load_straight_onto_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: torch.device, placement: dict
) -> None:
    # No GPU here: the call transformers receives is what decides where the weights go.
    folder = write_tiny_sa2va(tmp_path / "tiny_sa2va")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        transformers.AutoModel, "from_pretrained", lambda *a, **k: calls.append(k) or "model"
    )
    source = ModelSource.resolve(folder, None, False)
    model, tokenizer = loading.load_model(source, None, torch.float32, device)
    assert model == "model" and tokenizer.convert_tokens_to_ids("[SEG]") == 3
    (kwargs,) = calls
    assert kwargs.get("device_map") == placement.get("device_map")
