"""Build a segmentation backend by name: the one place the orchestrator and tests resolve
``backend.name`` from a config into a :class:`~models.segmentation.Segmenter`.

Backends are imported lazily so that choosing Frangi never imports transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.errors import UserError
from models.segmentation import Segmenter

if TYPE_CHECKING:  # models.heads imports torch, which a Frangi-only run never needs here
    from models.heads import HeadBackend

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


def make_head_backend(segmenter: Segmenter, base: Segmenter | None = None) -> HeadBackend:
    """The fine-tuning view (:class:`~models.heads.HeadBackend`) of a loaded backend, built in
    the process that holds the model (a segmentation worker; a trial reaches it through
    :class:`~orchestrator.inference.heads.WorkerHeadBackend`): Sa2VA's frozen inputs come from
    hooks on the model itself. ``base``: for Frangi, the segmenter its soft masks are read from
    (e.g. the worker's cache-backed one; default ``segmenter``).

    Raises:
        UserError: the backend has no head to fine-tune.
    """
    from models.heads import HeadBackend

    if isinstance(segmenter, HeadBackend):
        return segmenter
    if segmenter.backend_id.startswith("frangi:"):
        from models.frangi_head import FrangiHeadBackend

        return FrangiHeadBackend(base if base is not None else segmenter)
    if segmenter.backend_id.startswith("sa2va:"):
        from models.sa2va.head import Sa2VAHeadBackend
        from models.sa2va.segmenter import Sa2VASegmenter

        if isinstance(segmenter, Sa2VASegmenter):
            return Sa2VAHeadBackend(segmenter)
    raise UserError(
        f"backend {segmenter.backend_id} has no trainable head here: fine-tuning needs the "
        "plain Frangi backend or a Sa2VA checkpoint loaded in this process"
    )
