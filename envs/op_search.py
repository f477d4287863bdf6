"""Best post-processing op sequence by a score, without recomputation: the oracle's search.

:func:`search_op_sequences` returns exactly what the exhaustive search (every sequence of the
non-``stop`` ops of length <= ``depth``, each applied from ``start``) returns: the same sequence,
the same state and the same score, with the same tie-breaking. That tie-breaking is: the start
(the empty sequence) unless some sequence scores strictly higher; among sequences with the best
score, the shortest; among those, the first in ``config.ops`` order, compared op by op.

It gets there by two facts:

- *each prefix once*: sequences form a tree (a sequence's state is its prefix's state with one
  more op), so the search expands it breadth-first and applies every op to every state once;
- *identical states have identical futures*: ops are pure functions of the state, and a state
  is its mask plus its threshold (``prob`` is carried along unchanged by every op, so within
  one search it is the start's ``prob``). A state already reached (by hash of its mask bytes
  and its threshold) is neither scored nor expanded again. Its first occurrence in
  breadth-first order is the shortest, and among equally short ones the first in op order,
  sequence to reach it; every continuation of a later occurrence is matched by the same
  continuation of the first one, which is at most as long and comes earlier in that order, so
  the result is unchanged. (Stop and threshold ops without a ``prob`` return their state
  itself: pruned the same way.)

The search is pure: it reads ``start`` and calls ``score`` and
:func:`envs.mask_ops.apply_op`; no ground truth is needed beyond what ``score`` closes over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from models.metrics import mask_metrics

Score = Callable[[np.ndarray], float]
"""A mask's quality, higher is better (e.g. Dice against the ground truth)."""


@dataclass(frozen=True)
class OpSearchResult:
    """The best op sequence found and what the search cost.

    Attributes:
        sequence: the ops to apply to the start state, in order (empty: the start is best).
        state: the state that ``sequence`` gives.
        score: ``score(state.mask)``.
        applications: :func:`~envs.mask_ops.apply_op` calls made (the exhaustive search makes
            ``k + k**2 + ... + k**depth`` with ``k`` the non-``stop`` ops).
        distinct_states: distinct states scored, the start included.
    """

    sequence: tuple[str, ...]
    state: MaskState
    score: float
    applications: int
    distinct_states: int


def state_key(state: MaskState) -> tuple[float, bytes]:
    """What identifies a state within one search: its threshold and a 128-bit hash of its mask
    bits (shape and ``prob`` are those of the search's start)."""
    bits = np.packbits(state.mask)  # 8x less to hash than the bool bytes
    return state.threshold, hashlib.blake2b(bits.data, digest_size=16).digest()


def search_op_sequences(
    start: MaskState, score: Score, config: MaskOpsConfig, depth: int
) -> OpSearchResult:
    """The best sequence of ``config.ops`` (``stop`` left out) of length <= ``depth`` from
    ``start`` by ``score``, equal to the exhaustive search's answer (see the module docstring).

    Raises ``ValueError`` for a negative ``depth``.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    usable = [op for op in config.ops if op != "stop"]
    best_score, best_state = score(start.mask), start
    best_seq: tuple[str, ...] = ()
    seen = {state_key(start)}
    frontier: list[tuple[MaskState, tuple[str, ...]]] = [(start, ())]
    applications = 0
    for level in range(depth):
        grow = level + 1 < depth  # leaves are scored, never expanded
        nxt = []
        for state, seq in frontier:
            for op in usable:
                child = apply_op(op, state, config)
                applications += 1
                key = state_key(child)
                if key in seen:
                    continue
                seen.add(key)
                child_seq = (*seq, op)
                child_score = score(child.mask)
                if child_score > best_score:
                    best_score, best_state, best_seq = child_score, child, child_seq
                if grow:
                    nxt.append((child, child_seq))
        frontier = nxt
    return OpSearchResult(best_seq, best_state, best_score, applications, len(seen))


def best_ops_by_dice(
    start: MaskState, gt: np.ndarray, config: MaskOpsConfig, depth: int
) -> OpSearchResult:
    """:func:`search_op_sequences` scored by Dice against ``gt`` (bool HxW): the
    ``oracle_postprocess`` ceiling."""
    return search_op_sequences(start, lambda mask: mask_metrics(mask, gt).dice, config, depth)
