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

Hooks record only calls made by the thread inside :meth:`HeadInputRecorder.recording`, so other
threads segmenting with the same model at the same time do not leak into a recording.

:func:`pack_decoder_call` turns one decoder call into named CPU float32 tensors plus plain-data
facts (what :class:`models.heads.FrozenInputs` holds); :func:`unpack_decoder_call` rebuilds the
call's keyword arguments for a given language embedding.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

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
    """Records the inputs of ``text_hidden_fcs`` and ``sam_mask_decoder`` of one model."""

    def __init__(self, text_hidden_fcs: torch.nn.Module, decoder: torch.nn.Module) -> None:
        self._fcs = text_hidden_fcs
        self._decoder = decoder
        self._signature = inspect.signature(decoder.forward)
        self._thread: int | None = None
        self._recording = Recording()

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        """Hooks are installed for the ``with`` block and record this thread's calls only."""
        self._recording = Recording()
        self._thread = threading.get_ident()
        handles = [
            self._fcs.register_forward_hook(self._on_fcs),
            self._decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True),
        ]
        try:
            yield self._recording
        finally:
            for handle in handles:
                handle.remove()
            self._thread = None

    def _mine(self) -> bool:
        return self._thread == threading.get_ident()

    def _on_fcs(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._mine():
            return
        self._recording.fcs_calls += 1
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self._recording.seg_hidden = frozen(args[0])
            self._recording.language = frozen(output)

    def _on_decoder(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._mine():
            bound = self._signature.bind(*args, **kwargs)
            self._recording.decoder_calls.append(dict(bound.arguments))


def frozen(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy (never a view of the model's own memory)."""
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
