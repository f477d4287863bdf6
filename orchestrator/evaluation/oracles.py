"""Ceilings that use ground truth: the best post-processing sequence by Dice.

The search itself is :func:`envs.op_search.best_ops_by_dice`: a tree search (each prefix applied
once, states already reached pruned) that returns exactly what trying every sequence from
scratch returns (``tests/test_op_search.py`` checks it against that exhaustive search).
"""

from __future__ import annotations

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState
from envs.op_search import best_ops_by_dice


def oracle_postprocess_mask(
    start: MaskState, gt: np.ndarray, ops: MaskOpsConfig, depth: int
) -> tuple[np.ndarray, list[str]]:
    """Best mask (by Dice against ``gt``) over every op sequence of length <= ``depth`` from
    ``start``, and that sequence (empty when no sequence beats ``start``; ties go to the
    shortest sequence, then the first in ``ops.ops`` order)."""
    found = best_ops_by_dice(start, gt, ops, depth)
    return found.state.mask, list(found.sequence)
