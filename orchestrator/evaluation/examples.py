"""Example masks: which test images the report shows, and every method's mask of them (PNG)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from orchestrator import run_dir
from orchestrator.evaluation.per_image import ImageResult

EXAMPLE_ROLES = ("worst", "median", "best")


def pick_examples(baseline_rows: Sequence[ImageResult]) -> dict[str, str]:
    """Role (worst, median, best by baseline Dice; ties by image id) -> image id. With fewer
    than three images some roles share an image."""
    if not baseline_rows:
        raise ValueError("no baseline rows to pick examples from")
    ordered = sorted(baseline_rows, key=lambda r: (r.dice, r.image_id))
    picks = (ordered[0], ordered[len(ordered) // 2], ordered[-1])
    return {role: row.image_id for role, row in zip(EXAMPLE_ROLES, picks, strict=True)}


def example_mask_path(directory: Path, method: str, image_id: str) -> Path:
    """Where a method's final mask of ``image_id`` is saved (a file name safe on any OS)."""
    return directory / f"{method}__{re.sub(r'[^A-Za-z0-9._()-]', '_', image_id)}.png"


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A bool mask as an 8-bit PNG (0 / 255)."""
    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"could not encode {path}")
    run_dir.write_bytes(path, encoded.tobytes())


def read_mask_png(path: Path) -> np.ndarray:
    """A mask written by :func:`write_mask_png`, as bool."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"no readable mask PNG at {path}")
    return image > 127
