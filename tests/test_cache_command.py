"""``sa2va-rl cache``: size and entries per backend id and format version; pruning by backend id,
age and format, never touching what is not a cache entry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fakes import random_image

from models.segmentation import Segmentation, image_digest
from orchestrator.cli import main
from orchestrator.inference.cache import CacheKey, InferenceCache
from orchestrator.inference.cache_store import cache_usage, prune


def _fill(root: Path, backend: str, n: int) -> list[Path]:
    cache = InferenceCache(root)
    paths = []
    for i in range(n):
        key = CacheKey(backend, image_digest(random_image(i, 8)), "p")
        mask = np.zeros((8, 8), bool)
        cache.put(key, Segmentation(mask=mask, prob=mask.astype(np.float32)))
        paths.append(cache.path(key))
    return [p for p in paths if p is not None]


def _legacy_entry(root: Path) -> Path:
    """An entry of format 1 (before format directories existed)."""
    backend_dir = root / "0123456789abcdef"
    (backend_dir / "ab").mkdir(parents=True)
    (backend_dir / "BACKEND_ID.txt").write_text("frangi-v2\n")
    entry = backend_dir / "ab" / ("ab" + "0" * 62 + ".npz")
    entry.write_bytes(b"x" * 1000)
    return entry


def test_usage_per_backend_and_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _fill(tmp_path, "frangi-a", 3), _fill(tmp_path, "frangi-b", 1)
    legacy = _legacy_entry(tmp_path)
    (tmp_path / ".workers").mkdir()
    (tmp_path / ".workers" / "w.json").write_text("{}")
    usage = cache_usage(tmp_path)
    got = [(u.format_version, u.backend_id, u.entries, u.bytes, u.current) for u in usage]
    assert got == [
        (2, "frangi-a", 3, sum(p.stat().st_size for p in a), True),
        (2, "frangi-b", 1, b[0].stat().st_size, True),
        (1, "frangi-v2", 1, 1000, False),
    ]
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "frangi-a" in out and "v1 (unused)" in out and "total" in out
    assert legacy.exists()


def test_prune_by_backend_age_and_format(tmp_path: Path) -> None:
    old, new = _fill(tmp_path, "frangi-a", 2), _fill(tmp_path, "frangi-b", 2)
    legacy = _legacy_entry(tmp_path)
    (tmp_path / ".workers").mkdir()
    os.utime(old[0], (1_000_000.0, 1_000_000.0))
    assert prune(tmp_path, older_than_days=1, now=1_000_000.0 + 2 * 86400).entries == 1
    assert not old[0].exists() and old[1].exists() and all(p.exists() for p in new)
    assert prune(tmp_path, other_formats=True).entries == 1 and not legacy.exists()
    assert main(["cache", "--cache-dir", str(tmp_path), "--prune-backend", "frangi-b"]) == 0
    assert [u.backend_id for u in cache_usage(tmp_path)] == ["frangi-a"]
    assert not new[0].parent.parent.exists()  # the emptied backend directory went too
    assert (tmp_path / ".workers").is_dir()
    with pytest.raises(ValueError):
        prune(tmp_path)


def test_bad_age_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "--cache-dir", str(tmp_path), "--prune-older-than", "-1"]) == 2
    assert "--prune-older-than -1" in capsys.readouterr().err
