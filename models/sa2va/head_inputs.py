"""Recording a Sa2VA head's frozen inputs from the model's own ``predict_forward``.

The trainable part of Sa2VA (``text_hidden_fcs`` and SAM2's ``sam_mask_decoder``) sits between
two frozen parts: the LLM, whose last-layer hidden state at each ``[SEG]`` token enters
``text_hidden_fcs``, and SAM2's image side, whose features enter ``sam_mask_decoder``. Two hooks
on the loaded remote code (no edits to it) see exactly those inputs:

- a forward hook on ``text_hidden_fcs`` keeps its input (the ``[SEG]`` hidden states, one row
  per token) and its output (the language embeddings);
- a forward pre-hook on ``grounding_encoder.sam2_model.sam_mask_decoder`` keeps every argument
  of each call, bound to the decoder's signature: the image embedding (with SAM2's no-memory
  embedding already added), the high-resolution ``conv_s0``/``conv_s1`` features, the positional
  and dense prompt embeddings, flags, and ``sparse_prompt_embeddings``, whose last token is the
  language embedding and whose other tokens (SAM2's empty-point padding) are image-only.

A recording is split by ``predict_forward`` call (wrapped on the instance), so one
``segment_prompts`` call (image-only work shared, :mod:`models.sa2va.image_work`) gives one
:class:`Recording` per prompt. Hooks record only calls made by the thread inside
:meth:`HeadInputRecorder.recording`, so other threads segmenting with the same model at the
same time do not leak into a recording. Recorded tensors are copies made outside
``torch.inference_mode`` (the segmenter runs under it), so they can enter autograd.

:func:`pack_decoder_call` turns one decoder call into named CPU float32 tensors plus plain-data
facts (what :class:`models.heads.FrozenInputs` holds); :func:`unpack_decoder_call` rebuilds the
call's keyword arguments for a given language embedding.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from models.sa2va.image_work import shadow

SPARSE = "sparse_prompt_embeddings"
DECODER = "decoder."
SPARSE_PREFIX = "decoder.sparse_prefix"
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class Recording:
    """What one ``predict_forward`` call showed the hooks.

    Attributes:
        seg_hidden: ``text_hidden_fcs``'s input, ``(tokens, hidden)``; ``None`` if not called.
        language: ``text_hidden_fcs``'s output, ``(tokens, embedding)``; ``None`` if not called.
        fcs_calls: how many times ``text_hidden_fcs`` ran.
        decoder_calls: every ``sam_mask_decoder`` call's arguments by parameter name.
    """

    seg_hidden: torch.Tensor | None = None
    language: torch.Tensor | None = None
    fcs_calls: int = 0
    decoder_calls: list[dict[str, Any]] = field(default_factory=list)


class HeadInputRecorder:
    """Records the inputs of ``text_hidden_fcs`` and ``sam_mask_decoder`` of one model, per
    ``predict_forward`` call."""

    def __init__(
        self, model: torch.nn.Module, text_hidden_fcs: torch.nn.Module, decoder: torch.nn.Module
    ) -> None:
        self._model = model
        self._fcs = text_hidden_fcs
        self._decoder = decoder
        self._signature = inspect.signature(decoder.forward)
        self._thread: int | None = None
        self._calls: list[Recording] = []

    @contextmanager
    def recording(self) -> Iterator[list[Recording]]:
        """Within the block, this thread's ``predict_forward`` calls each append a
        :class:`Recording` to the yielded list; hooks and wrapper are removed on exit."""
        self._calls = []
        self._thread = threading.get_ident()
        predict: Callable[..., Any] = getattr(self._model, "predict_forward")  # noqa: B009

        def predict_forward(*args: Any, **kwargs: Any) -> Any:
            if self._thread == threading.get_ident():
                self._calls.append(Recording())
            return predict(*args, **kwargs)

        undo = [
            self._fcs.register_forward_hook(self._on_fcs).remove,
            self._decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True).remove,
            shadow(self._model, "predict_forward", predict_forward),
        ]
        try:
            yield self._calls
        finally:
            for step in reversed(undo):
                step()
            self._thread = None

    def _current(self) -> Recording | None:
        return self._calls[-1] if self._calls and self._thread == threading.get_ident() else None

    def _on_fcs(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        recording = self._current()
        if recording is None:
            return
        recording.fcs_calls += 1
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            recording.seg_hidden = frozen(args[0])
            recording.language = frozen(output)

    def _on_decoder(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        recording = self._current()
        if recording is not None:
            recording.decoder_calls.append(dict(self._signature.bind(*args, **kwargs).arguments))


def frozen(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy (never a view of the model's own memory), made
    outside inference mode so that it can enter autograd."""
    with torch.inference_mode(False):
        return tensor.detach().to("cpu", torch.float32, copy=True).contiguous()


def pack_decoder_call(
    call: Mapping[str, Any], language: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One decoder call as (named frozen tensors, plain-data facts), without the language token.

    ``language`` is the embedding this call was made for; the last token of the call's
    ``sparse_prompt_embeddings`` must be it (else the model builds the prompt another way and
    ``RuntimeError`` is raised). Tensors are named ``decoder.<argument>`` (``.<i>`` for list
    items) and ``decoder.sparse_prefix``; facts are ``decoder_values`` (non-tensor arguments)
    and ``decoder_lists`` (list lengths).
    """
    sparse = call.get(SPARSE)
    if not isinstance(sparse, torch.Tensor) or sparse.ndim != 3 or sparse.shape[1] < 1:
        raise RuntimeError(
            f"sam_mask_decoder was called without a (batch, tokens, dim) {SPARSE} "
            f"(got {type(sparse).__name__}); cannot separate the [SEG] embedding from it"
        )
    if not torch.allclose(frozen(sparse[:, -1]), language.reshape(1, -1), rtol=1e-2, atol=1e-3):
        raise RuntimeError(
            f"the last token of {SPARSE} is not text_hidden_fcs's output for the [SEG] token; "
            "this model's code builds SAM2's prompt in a way the head does not reproduce"
        )
    tensors = {SPARSE_PREFIX: frozen(sparse[:, :-1])}
    values: dict[str, Any] = {}
    lists: dict[str, int] = {}
    for name, value in call.items():
        if name == SPARSE:
            continue
        if isinstance(value, torch.Tensor):
            tensors[DECODER + name] = frozen(value)
        elif isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value):
            lists[name] = len(value)
            tensors.update({f"{DECODER}{name}.{i}": frozen(v) for i, v in enumerate(value)})
        elif isinstance(value, _PLAIN):
            values[name] = value
        else:
            raise RuntimeError(
                f"sam_mask_decoder argument {name!r} is a {type(value).__name__}, which a "
                "frozen input cannot hold"
            )
    return tensors, {"decoder_values": values, "decoder_lists": lists}


def unpack_decoder_call(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    language: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """The decoder's keyword arguments for one language embedding ``(embedding,)``, on
    ``device``: the packed call with ``language`` appended to the sparse prefix."""
    lists: Mapping[str, int] = meta["decoder_lists"]
    listed = {f"{DECODER}{name}.{i}" for name, n in lists.items() for i in range(n)}
    kwargs: dict[str, Any] = dict(meta["decoder_values"])
    for key, tensor in tensors.items():
        if key.startswith(DECODER) and key != SPARSE_PREFIX and key not in listed:
            kwargs[key.removeprefix(DECODER)] = tensor.to(device)
    for name, n in lists.items():
        kwargs[name] = [tensors[f"{DECODER}{name}.{i}"].to(device) for i in range(n)]
    prefix = tensors[SPARSE_PREFIX].to(device)
    kwargs[SPARSE] = torch.cat([prefix, language.reshape(1, 1, -1).to(prefix.dtype)], dim=1)
    return kwargs
