"""Build a segmentation backend by name: the one place the orchestrator and tests resolve
``backend.name`` from a config into a :class:`~models.segmentation.Segmenter`.

Backends are imported lazily so that choosing Frangi never imports transformers.
"""

from __future__ import annotations

from typing import Any

from models.errors import UserError
from models.segmentation import Segmenter

BACKENDS = ("frangi", "sa2va")


def make_segmenter(name: str, **options: Any) -> Segmenter:
    """Instantiate backend ``name`` with its keyword ``options`` (Frangi with ``head_path``:
    the exported fine-tuned head of that folder, :func:`models.frangi_head.load_head_segmenter`)."""
    if name == "frangi":
        head_path = options.pop("head_path", None)
        if head_path is not None:
            from models.frangi_head import load_head_segmenter

            return load_head_segmenter(head_path)
        from models.frangi import FrangiSegmenter

        return FrangiSegmenter(**options)
    if name == "sa2va":
        from models.sa2va import Sa2VASegmenter

        return Sa2VASegmenter(**options)
    raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
