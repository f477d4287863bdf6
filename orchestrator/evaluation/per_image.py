"""The per-image results (``eval/per_image.csv``): the row type every method yields, and its
CSV, written by the evaluation stage and read back by the report."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from orchestrator import run_dir


@dataclass(frozen=True)
class ImageResult:
    """One method's final mask on one image, measured: a row of the per-image CSV.

    ``seed``: the training seed of the policy (``experiments.seeds``); 0 for methods that do
    not learn per seed."""

    method: str
    image_id: str
    dice: float
    recall: float
    precision: float
    iou: float
    detail: str = ""
    seed: int = 0


def write_rows(path: Path, rows: Sequence[ImageResult]) -> None:
    """The per-image CSV; floats as ``repr`` so reading them back gives the same numbers."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [f.name for f in fields(ImageResult)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in asdict(row).items()})
    run_dir.write_text(path, buffer.getvalue())


def read_rows(path: Path) -> list[ImageResult]:
    """Rows written by :func:`write_rows`, in file order (a file without a ``seed`` column:
    seed 0)."""
    with path.open(newline="") as handle:
        return [
            ImageResult(
                method=r["method"],
                image_id=r["image_id"],
                dice=float(r["dice"]),
                recall=float(r["recall"]),
                precision=float(r["precision"]),
                iou=float(r["iou"]),
                detail=r["detail"],
                seed=int(r.get("seed") or 0),
            )
            for r in csv.DictReader(handle)
        ]
