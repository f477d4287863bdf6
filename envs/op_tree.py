"""Every post-processing op sequence up to a depth, and the mask each one gives on an image.

:mod:`envs.op_search` finds the single best sequence by a score (the oracle). The op-sequence
baselines need more: the outcome of *every* sequence on every training image, to learn which
sequence to apply (``supervised_ops``: a regressor from the observation to each sequence's Dice;
``best_fixed_ops``: the one sequence best on average). :func:`sequence_states` gives that, at the
cost of each distinct state expanded once: sequences reaching a state already expanded (same
mask and threshold, :func:`envs.op_search.state_key`) reuse its children.

Sequences never contain ``stop``: a sequence shorter than the depth is "apply these, then stop".
Their order (:func:`all_sequences`) is fixed: the empty sequence, then by length, then in
``config.ops`` order op by op, the tie-breaking order of the oracle.
"""

from __future__ import annotations

import itertools

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from envs.op_search import state_key

OpSequence = tuple[str, ...]


def all_sequences(config: MaskOpsConfig, depth: int) -> list[OpSequence]:
    """Every sequence of the non-``stop`` ops of length ``0..depth``, in the fixed order."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    usable = [op for op in config.ops if op != "stop"]
    return [seq for n in range(depth + 1) for seq in itertools.product(usable, repeat=n)]


def sequence_states(start: MaskState, config: MaskOpsConfig, depth: int) -> list[MaskState]:
    """The state each sequence of :func:`all_sequences` gives from ``start``, in that order."""
    usable = [op for op in config.ops if op != "stop"]
    children: dict[tuple[float, bytes], list[MaskState]] = {}

    def expand(state: MaskState) -> list[MaskState]:
        key = state_key(state)
        if key not in children:
            children[key] = [apply_op(op, state, config) for op in usable]
        return children[key]

    states = [start]
    level = [start]
    for _ in range(depth):
        level = [child for state in level for child in expand(state)]
        states += level
    return states


def apply_sequence(start: MaskState, sequence: OpSequence, config: MaskOpsConfig) -> MaskState:
    """The state ``sequence`` gives from ``start``."""
    state = start
    for op in sequence:
        state = apply_op(op, state, config)
    return state
