"""What a segmentation worker serves: the backend it loads (:class:`BackendSpec`, a picklable
name + options, described stably so a reused worker can be compared) and the image contract
every request is checked against (:func:`check_image`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.segmentation import Segmenter

BackendFactory = Callable[[], Segmenter]
"""A picklable zero-argument callable that builds the backend inside the worker."""


@dataclass(frozen=True)
class BackendSpec:
    """A backend by name and options: ``models.backends.make_segmenter(name, **options)``.

    Picklable and cheap to send; the worker calls it once per incarnation to load the model.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self) -> Segmenter:
        from models.backends import make_segmenter  # the backend registry of the foundation issue

        segmenter: Segmenter = make_segmenter(self.name, **dict(self.options))
        return segmenter


def describe_factory(factory: BackendFactory) -> str:
    """A stable description of a backend factory (equal for equal specs across processes)."""
    if dataclasses.is_dataclass(factory):
        return repr(factory)  # field by field, e.g. BackendSpec(name='sa2va', options={...})
    named = factory if hasattr(factory, "__qualname__") else type(factory)  # function or class
    return f"{named.__module__}.{named.__qualname__}"


def check_image(image: Any) -> None:
    """Raise ``ValueError`` unless ``image`` is a uint8 HxWx3 array (the Segmenter contract)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be a uint8 HxWx3 numpy array, got {_describe(image)}")
    if image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be a uint8 HxWx3 numpy array, got shape {image.shape}")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
