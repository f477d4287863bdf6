"""Bounded generation: at most ``max_new_tokens`` answer tokens per ``predict_forward``, and a
flag when the answer was cut.

Upstream lets Sa2VA generate up to 2,048 new tokens, keeping every step's hidden states
(InternVL-style code through ``preparing_for_generation(max_new_tokens=2048)`` into
``language_model.generate(generation_config=...)``; Qwen-VL-style code passes
``max_new_tokens=2048`` to ``model.generate`` itself). :class:`AnswerLimit` wraps that LLM
``generate`` on the instance (``model.language_model``, else ``model.model``) and sets the
``max_new_tokens`` keyword, which overrides both. A call that produced ``max_new_tokens`` tokens
without ending on an end-of-sequence id was cut: its answer (and any [SEG] token past the cut)
is incomplete, and :attr:`AnswerLimit.truncated` says so until the next call. An answer exactly
``max_new_tokens`` long that ends on a stop word other than EOS counts as cut (conservative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.sa2va.image_work import shadow

FLAG_ANSWER_TRUNCATED = "answer_truncated"
DEFAULT_MAX_NEW_TOKENS = 64
"""Enough for Sa2VA's segmentation answers ("Sure, [SEG]." is about 5 tokens) with room for a
longer sentence; an answer still running at this length is cut and flagged."""


class AnswerLimit:
    """Caps the new tokens of a Sa2VA model's LLM ``generate`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_new_tokens: int, eos_token_id: Any) -> None:
        self.max_new_tokens = max_new_tokens
        self.truncated = False
        self.unavailable_reason: str | None = None
        self._eos = _ids(eos_token_id)
        self._undo: Callable[[], None] | None = None
        llm = next(
            (
                getattr(model, name)
                for name in ("language_model", "model")
                if callable(getattr(getattr(model, name, None), "generate", None))
            ),
            None,
        )
        if llm is None:
            self.unavailable_reason = (
                f"{type(model).__name__} has neither language_model.generate nor model.generate; "
                "max_new_tokens cannot be applied and answers are not bounded"
            )
            return
        self._wrap(llm)

    def _wrap(self, llm: Any) -> None:
        original = llm.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            kwargs["max_new_tokens"] = self.max_new_tokens
            output = original(*args, **kwargs)
            self.truncated = self._was_cut(output, kwargs, llm)
            return output

        self._undo = shadow(llm, "generate", generate)

    def _was_cut(self, output: Any, kwargs: dict[str, Any], llm: Any) -> bool:
        sequences = getattr(output, "sequences", output)
        if not isinstance(sequences, torch.Tensor) or sequences.numel() == 0:
            return False
        prompt = kwargs.get("input_ids")
        # transformers returns the prompt ids in front of the answer only when given input_ids.
        new_tokens = sequences.shape[-1] - (prompt.shape[-1] if prompt is not None else 0)
        eos = self._eos | _ids(getattr(kwargs.get("generation_config"), "eos_token_id", None))
        eos |= _ids(getattr(getattr(llm, "generation_config", None), "eos_token_id", None))
        return new_tokens >= self.max_new_tokens and int(sequences[0, -1]) not in eos

    def remove(self) -> None:
        """Restore the LLM's own ``generate``."""
        if self._undo is not None:
            self._undo()
            self._undo = None


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.flatten()}
    return {int(v) for v in value}
