"""Image-only work of a Sa2VA model done once per image, and the [SEG] hidden states, for any
caller that runs several prompts on one image (the segmenter, the fine-tuning head's inputs).

Upstream's ``predict_forward`` recomputes, for every prompt, the vision encoder's output and, for
every [SEG] token, SAM2's image features. :class:`ImageWork` wraps those image-only functions on
the loaded model's instances (upstream files are not edited; classes are not touched):

- ``vision``: ``model.extract_feature(pixel_values)`` (InternVL-style v2 and v1: InternViT +
  ``mlp1``), else the Qwen-VL visual tower ``model.model.visual`` (its ``forward(pixel_values,
  grid_thw=...)``, which transformers' Qwen2.5-VL / Qwen3-VL ``get_image_features`` call);
- ``sam2``: ``model.grounding_encoder.sam2_model.forward_image(img_batch)`` (Hiera + FPN), which
  upstream's ``_get_image_feature`` calls when the inference state's ``cached_features`` misses.

Contract:

- Outside :meth:`ImageWork.shared` every wrapped call runs the original and keeps nothing.
- Inside ``with work.shared() as session:`` each wrapped function keeps its last (inputs,
  output); a call whose inputs are equal to the kept ones (same types, shapes, dtypes, devices
  and values, ``torch.equal``) returns the kept output (lists and dicts re-created, tensors
  shared) instead of running again; other inputs run the original and replace what was kept.
  So the answers are those of the unshared path, bit for bit, whatever the prompts. On leaving
  the block everything kept is dropped (also on an exception).
- ``session.seg_hidden_states`` lists, per call of ``model.text_hidden_fcs`` in the block (one
  per ``predict_forward`` that read out [SEG] tokens), its input: the last-layer hidden states
  at the [SEG] positions, shape ``(n_seg, hidden)``, detached. ``session.kept("sam2")`` is the
  last ``(args, kwargs, output)`` of SAM2's image encoder (``None`` until one ran), e.g. the
  ``backbone_out`` dict a mask decoder needs.
- Tensors seen inside ``torch.inference_mode()`` (as the segmenter runs) are inference tensors:
  ``.clone()`` one before it enters autograd, and copy what must outlive the model call.
- ``counts()`` gives, per wrapped site, how many times the original ran and how many calls were
  answered from what was kept, since construction (benchmarks and tests).
- Not thread-safe: callers serialise calls on one model (the segmenter's lock does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

VISION = "vision"
SAM2 = "sam2"


@dataclass
class Session:
    """What one :meth:`ImageWork.shared` block saw (see the module docstring)."""

    seg_hidden_states: list[torch.Tensor] = field(default_factory=list)
    _memos: dict[str, _Memo] = field(default_factory=dict)

    def kept(self, site: str) -> tuple[tuple[Any, ...], dict[str, Any], Any] | None:
        """The last ``(args, kwargs, output)`` of ``site`` (``"vision"``/``"sam2"``) kept in
        this block, or ``None``."""
        memo = self._memos.get(site)
        return None if memo is None else memo.kept


class ImageWork:
    """Memos around a Sa2VA model's image-only functions (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._memos: dict[str, _Memo] = {}
        self._session: Session | None = None
        self._undo: list[Callable[[], None]] = []
        for site, (owner, attr) in _sites(model).items():
            memo = _Memo(getattr(owner, attr))
            self._undo.append(shadow(owner, attr, memo))
            self._memos[site] = memo
        fcs = getattr(model, "text_hidden_fcs", None)
        if isinstance(fcs, torch.nn.Module):
            self._undo.append(fcs.register_forward_pre_hook(self._on_seg_hidden).remove)

    @property
    def sites(self) -> tuple[str, ...]:
        """The wrapped sites this model has (``"vision"``, ``"sam2"``)."""
        return tuple(self._memos)

    @contextmanager
    def shared(self) -> Iterator[Session]:
        """Share image-only work between the calls in the block; dropped on exit."""
        session = Session(_memos=self._memos)
        self._session = session
        for memo in self._memos.values():
            memo.active = True
        try:
            yield session
        finally:
            for memo in self._memos.values():
                memo.active = False
                memo.kept = None
            self._session = None

    def counts(self) -> dict[str, dict[str, int]]:
        """``{site: {"computed": n, "reused": m}}`` since construction."""
        return {s: {"computed": m.computed, "reused": m.reused} for s, m in self._memos.items()}

    def remove(self) -> None:
        """Restore the model's own functions and remove the hook."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        self._memos = {}

    def _on_seg_hidden(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._session is not None and args and isinstance(args[0], torch.Tensor):
            self._session.seg_hidden_states.append(args[0].detach())


class _Memo:
    """One wrapped function: runs it, or answers from the last equal call while active."""

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.active = False
        self.kept: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self.computed = 0
        self.reused = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.active and self.kept is not None and _equal((args, kwargs), self.kept[:2]):
            self.reused += 1
            return _fresh_containers(self.kept[2])
        output = self.original(*args, **kwargs)
        self.computed += 1
        if self.active:
            self.kept = (_detached(args), _detached(kwargs), _detached(output))
            return _fresh_containers(output)
        return output


def _sites(model: torch.nn.Module) -> dict[str, tuple[Any, str]]:
    sites: dict[str, tuple[Any, str]] = {}
    if callable(getattr(model, "extract_feature", None)):
        sites[VISION] = (model, "extract_feature")
    else:
        visual = getattr(getattr(model, "model", None), "visual", None)
        if isinstance(visual, torch.nn.Module):
            sites[VISION] = (visual, "forward")
    sam2 = getattr(getattr(model, "grounding_encoder", None), "sam2_model", None)
    if callable(getattr(sam2, "forward_image", None)):
        sites[SAM2] = (sam2, "forward_image")
    return sites


def shadow(owner: Any, attr: str, value: Any) -> Callable[[], None]:
    """Set ``owner.attr = value`` on the instance only (its class is untouched); returns the
    undo, which restores what the instance had (or removes the attribute)."""
    had, previous = attr in vars(owner), vars(owner).get(attr)
    object.__setattr__(owner, attr, value)
    if had:
        return lambda: object.__setattr__(owner, attr, previous)
    return lambda: object.__delattr__(owner, attr)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object without a usable ==: never treat it as equal
        return False


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if type(value) in (list, tuple):
        return type(value)(_detached(v) for v in value)
    if type(value) is dict:
        return {k: _detached(v) for k, v in value.items()}
    return value


def _fresh_containers(value: Any) -> Any:
    """``value`` with its lists and dicts re-created (tensors shared), so a caller that
    reassigns an entry (``backbone_out["backbone_fpn"][0] = ...``) cannot change what is kept."""
    if type(value) in (list, tuple):
        return type(value)(_fresh_containers(v) for v in value)
    if type(value) is dict:
        return {k: _fresh_containers(v) for k, v in value.items()}
    return value
