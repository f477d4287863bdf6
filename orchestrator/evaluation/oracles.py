"""Ceilings that use ground truth: the best post-processing sequence by exhaustive search."""

from __future__ import annotations

import numpy as np

from envs.mask_ops import MaskOpsConfig, MaskState, apply_op
from models.metrics import mask_metrics


def oracle_postprocess_mask(
    start: MaskState, gt: np.ndarray, ops: MaskOpsConfig, depth: int
) -> tuple[np.ndarray, list[str]]:
    """Best mask (by Dice) over every op sequence of length <= ``depth`` from ``start``."""
    usable = [op for op in ops.ops if op != "stop"]
    best: tuple[float, np.ndarray, list[str]] = (mask_metrics(start.mask, gt).dice, start.mask, [])
    frontier: list[tuple[MaskState, list[str]]] = [(start, [])]
    for _ in range(depth):
        nxt = []
        for state, seq in frontier:
            for op in usable:
                child = apply_op(op, state, ops)
                score = mask_metrics(child.mask, gt).dice
                if score > best[0]:
                    best = (score, child.mask, [*seq, op])
                nxt.append((child, [*seq, op]))
        frontier = nxt
    return best[1], best[2]
