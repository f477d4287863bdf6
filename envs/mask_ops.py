"""Post-processing operations on a segmentation mask: the action set of the PostProcess env.

A :class:`MaskState` holds the current hard mask, the backend's soft mask (``prob``, or ``None``)
and the threshold that last built the mask from ``prob``. :func:`apply_op` maps one named
operation and a state to a new state; :data:`ALL_OPS` lists every operation in a fixed order, and
:class:`MaskOpsConfig` (:mod:`envs.mask_ops_config`) holds their parameters plus the action set an
environment offers as its discrete actions: action ``i`` is ``config.ops[i]``. The operations
themselves live in :mod:`envs.morphology` and :mod:`envs.bridging`.

Rules a caller can rely on:

- Operations are pure and deterministic: they never modify the arrays of the state they get.
  Treat ``MaskState`` arrays as read-only.
- Morphological operations (everything except the threshold ops, ``grow_region`` and ``stop``)
  act on ``mask`` only; ``prob`` and ``threshold`` are carried over unchanged. ``grow_region``
  adds regions grown in ``prob`` to ``mask`` (threshold unchanged).
- Threshold ops move ``threshold`` (``threshold_down``/``threshold_up`` by ``threshold_step``,
  ``lower_threshold`` by the factor ``threshold_factor``; clipped to ``[threshold_min,
  threshold_max]``) and **rebuild** the mask as ``prob > threshold``, discarding any earlier
  morphology (also when clipping leaves the threshold where it was). This is the simplest rule
  that keeps the mask a pure function of (prob, threshold, ops applied since the last threshold
  op); an agent that wants both applies the threshold first.
- Without a soft mask (``prob is None``) the ops of :data:`PROB_OPS` are no-ops and return the
  state object itself; :func:`op_available` tells the env so it can report it in ``info``.
- ``stop`` returns the state unchanged; ending the episode is the env's job.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from envs import morphology
from envs.bridging import bridge_gaps
from envs.mask_ops_config import (
    ACTION_SETS,
    ALL_OPS,
    KERNEL_SHAPES,
    OPS,
    ORIGINAL_OPS,
    PROB_OPS,
    THRESHOLD_OPS,
    MaskOpsConfig,
)
from models.segmentation import Segmentation, check_mask_and_prob

__all__ = [
    "ACTION_SETS",
    "ALL_OPS",
    "KERNEL_SHAPES",
    "OPS",
    "ORIGINAL_OPS",
    "PROB_OPS",
    "THRESHOLD_OPS",
    "MaskOpsConfig",
    "MaskState",
    "apply_action",
    "apply_op",
    "op_available",
]


class MaskState:
    """The mask being post-processed (immutable).

    Attributes:
        mask: bool HxW, the current hard mask.
        prob: float32 HxW soft mask in [0, 1], or ``None`` when the backend gave none.
        threshold: the threshold ``mask`` was last built with from ``prob`` (``prob > threshold``);
            nominal (0.5 by default) when ``prob`` is ``None``.
        origin: how the state was made from its image, when known: the prompt, then the name of
            every op applied since (:func:`apply_op` extends it). Within one environment (one
            segmenter, one op config) equal origins on one image mean equal states, so derived
            values such as the observation can be memoised by it; ``None``: unknown.

    A state can be *deferred* (:meth:`deferred`): known by its origin, built by a function the
    first time its ``mask`` or ``prob`` is read. An environment that has memoised what it needs
    of a revisited state never builds it (a prompt's state: no segmentation request at all).
    """

    __slots__ = ("_build", "_mask", "_prob", "_threshold", "origin")

    def __init__(
        self,
        mask: np.ndarray,
        prob: np.ndarray | None,
        threshold: float = 0.5,
        origin: tuple[str, ...] | None = None,
    ) -> None:
        check_mask_and_prob(mask, prob)
        self._mask: np.ndarray | None = mask
        self._prob = prob
        self._threshold = _checked_threshold(threshold)
        self.origin = origin
        self._build: Callable[[], MaskState] | None = None

    @classmethod
    def deferred(
        cls, origin: tuple[str, ...], build: Callable[[], MaskState], threshold: float = 0.5
    ) -> MaskState:
        """The state of ``origin``, built by ``build()`` when first read (which must give a
        state of the same origin and threshold)."""
        state = cls.__new__(cls)
        state._mask = state._prob = None
        state._threshold = _checked_threshold(threshold)
        state.origin = origin
        state._build = build
        return state

    @classmethod
    def from_segmentation(
        cls, seg: Segmentation, threshold: float = 0.5, prompt: str | None = None
    ) -> MaskState:
        """Start from a backend answer: its hard mask as is, its soft mask for threshold ops;
        ``prompt``, the prompt it answered, starts the state's ``origin``."""
        origin = None if prompt is None else (prompt,)
        return cls(mask=seg.mask, prob=seg.prob, threshold=threshold, origin=origin)

    @property
    def mask(self) -> np.ndarray:
        self._ensure_built()
        assert self._mask is not None
        return self._mask

    @property
    def prob(self) -> np.ndarray | None:
        self._ensure_built()
        return self._prob

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def is_built(self) -> bool:
        """Whether the arrays exist (always, unless the state is deferred and unread)."""
        return self._build is None

    def derived(self, op: str, mask: np.ndarray, threshold: float | None = None) -> MaskState:
        """The state ``op`` turned this one into (same soft mask; ``origin`` extended)."""
        return MaskState(
            mask=mask,
            prob=self.prob,
            threshold=self.threshold if threshold is None else threshold,
            origin=None if self.origin is None else (*self.origin, op),
        )

    def _ensure_built(self) -> None:
        if self._build is None:
            return
        built = self._build()
        if built.origin != self.origin or built.threshold != self._threshold:
            raise ValueError(
                f"a deferred state of origin {self.origin} and threshold {self._threshold} was "
                f"built as origin {built.origin} and threshold {built.threshold}"
            )
        self._mask, self._prob, self._build = built.mask, built.prob, None


def _checked_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def op_available(name: str, state: MaskState) -> bool:
    """Whether ``name`` can change anything in principle: the ops of PROB_OPS need a soft mask."""
    _check_name(name)
    return name not in PROB_OPS or state.prob is not None


def apply_action(index: int, state: MaskState, config: MaskOpsConfig) -> MaskState:
    """Apply action ``index``, i.e. operation ``config.ops[index]``."""
    if not 0 <= index < len(config.ops):
        raise ValueError(f"action {index} out of range: {len(config.ops)} ops {config.ops}")
    return apply_op(config.ops[index], state, config)


def apply_op(name: str, state: MaskState, config: MaskOpsConfig) -> MaskState:
    """Apply operation ``name`` (one of ``ALL_OPS``) to ``state``; returns a new state.

    Returns ``state`` itself for ``stop`` and for the ops of PROB_OPS when ``state.prob`` is
    ``None``.
    """
    _check_name(name)
    if name == "stop":
        return state
    if name in PROB_OPS and state.prob is None:
        return state
    if name in THRESHOLD_OPS:
        return _rethreshold(state, config, name)
    if name == "grow_region":
        assert state.prob is not None
        new_mask = morphology.grow_region(state.mask, state.prob, config)
    else:
        new_mask = _MASK_OPS[name](state.mask, config)
    return state.derived(name, new_mask)


def _check_name(name: str) -> None:
    if name not in ALL_OPS:
        raise ValueError(f"unknown mask operation {name!r}; known: {ALL_OPS}")


def _rethreshold(state: MaskState, config: MaskOpsConfig, name: str) -> MaskState:
    assert state.prob is not None
    if name == "lower_threshold":
        target = state.threshold * config.threshold_factor
    else:
        step = config.threshold_step if name == "threshold_up" else -config.threshold_step
        target = state.threshold + step
    # Rounding keeps repeated steps exact (0.5 - 0.1 - 0.1 == 0.3), so equal action sequences
    # give bit-equal thresholds and tests can name the expected value.
    new_t = round(min(config.threshold_max, max(config.threshold_min, target)), 9)
    return state.derived(name, state.prob > new_t, new_t)


_MASK_OPS: dict[str, Callable[[np.ndarray, MaskOpsConfig], np.ndarray]] = {
    "dilate": morphology.dilate,
    "erode": morphology.erode,
    "open": morphology.open_,
    "close": morphology.close,
    "fill_holes": morphology.fill_holes,
    "remove_small": morphology.remove_small,
    "bridge_gaps": bridge_gaps,
    "dilate_3": lambda mask, _: morphology.dilate_square(mask, 3),
    "dilate_5": lambda mask, _: morphology.dilate_square(mask, 5),
}
