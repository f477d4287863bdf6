"""Means with bootstrap 95% CIs, paired differences to the reference methods, verdicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.metrics import METRIC_NAMES
from orchestrator.evaluation.methods import BASELINE_METHODS, METHODS
from orchestrator.evaluation.per_image import ImageResult

REFERENCES = ("baseline", "best_fixed_prompt", *BASELINE_METHODS)
"""Methods every other method gets a paired difference to (see :func:`summarise`)."""


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% bootstrap confidence interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = 2000) -> Estimate:
    """Mean and percentile 95% CI from ``resamples`` bootstrap resamples (seeded)."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        raise ValueError("no values to estimate a mean from")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    mean = float(data.mean())
    # Percentiles of resampled means can miss the sample mean by rounding on tiny samples.
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)))


def verdict(difference: Estimate) -> str:
    """ "better" / "worse" when the paired 95% CI excludes 0, else "no significant difference"."""
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "no significant difference"


@dataclass(frozen=True)
class MethodSummary:
    """A method's means with CIs, and its paired differences to each reference method.

    Attributes:
        paired: reference method (see :data:`REFERENCES`) -> metric -> mean of the per-image
            difference ``method - reference`` with its bootstrap CI (on the shared images).
    """

    method: str
    n: int
    metrics: dict[str, Estimate]
    paired: dict[str, dict[str, Estimate]]

    @property
    def vs_baseline(self) -> dict[str, Estimate]:
        return self.paired.get("baseline", {})


def paired_difference(
    results: Mapping[str, ImageResult],
    reference: Mapping[str, ImageResult],
    *,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Metric -> mean per-image difference ``results - reference`` with its bootstrap CI, over
    the image ids both hold (empty when they share none)."""
    shared = sorted(set(results) & set(reference))
    if not shared:
        return {}
    return {
        name: bootstrap_mean(
            [getattr(results[i], name) - getattr(reference[i], name) for i in shared], seed=seed
        )
        for name in METRIC_NAMES
    }


def summarise(
    rows: Iterable[ImageResult], *, seed: int = 0, references: Sequence[str] = REFERENCES
) -> dict[str, MethodSummary]:
    """Per-method summaries (in the order methods first appear in ``rows``), with paired
    differences to every reference method present."""
    by_method: dict[str, dict[str, ImageResult]] = {}
    for row in rows:
        by_method.setdefault(row.method, {})[row.image_id] = row
    out = {}
    for method, results in by_method.items():
        ids = sorted(results)
        metrics = {
            name: bootstrap_mean([getattr(results[i], name) for i in ids], seed=seed)
            for name in METRIC_NAMES
        }
        paired = {
            ref: paired_difference(results, by_method[ref], seed=seed)
            for ref in references
            if ref in by_method
        }
        out[method] = MethodSummary(method, len(ids), metrics, paired)
    return out


def ordered(summaries: Mapping[str, MethodSummary]) -> list[MethodSummary]:
    """The summaries in report order (:data:`~orchestrator.evaluation.methods.METHODS`)."""
    return [summaries[m] for m in METHODS if m in summaries]


def best_method(summaries: Mapping[str, MethodSummary]) -> str:
    """The non-oracle method with the highest mean Dice (the baseline if it is the only one)."""
    candidates = [m for m in summaries if not m.startswith("oracle") and m != "baseline"]
    if not candidates:
        return "baseline"
    return max(candidates, key=lambda m: (summaries[m].metrics["dice"].mean, m))
