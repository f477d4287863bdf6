"""Means with bootstrap 95% CIs that respect videos and seeds, paired differences, verdicts.

Frames of one video are near-duplicates and the split keeps whole videos together, so the
test images are not independent: the CI that the verdicts use resamples *videos* (a cluster
bootstrap over the split's groups), and, for a method trained with several seeds, resamples
seeds and videos together (a stratified bootstrap as in Agarwal et al., NeurIPS 2021: seeds with
replacement, videos with replacement, independently). The image-level CI (every image its own
group) is kept beside it, labelled, to show how much narrower the naive one is.

Point estimate: the mean over seeds of each seed's mean over the test images (every seed is
evaluated on the same images). A resample's statistic is the same quantity on the resampled
seeds and videos, a video weighing by its number of frames (so identical frames within a video
give exactly the CI of one frame per video).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.metrics import METRIC_NAMES
from orchestrator.evaluation.methods import BASELINE_METHODS, METHODS
from orchestrator.evaluation.per_image import ImageResult

REFERENCES = ("baseline", "best_fixed_prompt", *BASELINE_METHODS)
"""Methods every other method gets a paired difference to (see :func:`summarise`)."""
RESAMPLES = 2000
MIN_TEST_VIDEOS = 8
"""Below this many test videos the report warns that the video-level CIs are unreliable: a
percentile bootstrap over G clusters cannot express more than G distinct cluster draws' worth of
spread, and with fewer than ~8 its 95% CI is known to under-cover badly (Cameron, Gelbach &
Miller 2008 find cluster-robust inference unreliable below 5-10 clusters)."""


UNDETERMINED = "undetermined (one video)"


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% bootstrap confidence interval.

    ``groups``: how many groups (videos, or images at image level) the bootstrap resampled;
    with one, the CI is a point and says nothing (``None``: not known, e.g. read back)."""

    mean: float
    low: float
    high: float
    groups: int | None = field(default=None, compare=False)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    groups: Sequence[str] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Estimate:
    """Mean and percentile 95% CI from ``resamples`` seeded bootstrap resamples.

    Args:
        values: one value per image (1-D), or one row per training seed (2-D, seeds x images,
            the same images in every row).
        groups: the video of each image (column); ``None``: every image its own group.
            Videos are resampled with replacement, and with several rows so are the rows
            (independently); a resample's statistic is the mean over its rows of each row's
            frame-weighted mean over its videos.
    """
    data = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if data.size == 0:
        raise ValueError("no values to estimate a mean from")
    labels = np.arange(data.shape[1]) if groups is None else np.asarray(groups)
    if len(labels) != data.shape[1]:
        raise ValueError(f"{len(labels)} groups for {data.shape[1]} values")
    _, inverse = np.unique(labels, return_inverse=True)
    n_groups, n_seeds = int(inverse.max()) + 1, data.shape[0]
    sums = np.stack([np.bincount(inverse, weights=row, minlength=n_groups) for row in data])
    counts = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    group_weights = _draw_counts(rng, n_groups, resamples)
    per_seed = (group_weights @ sums.T) / (group_weights @ counts)[:, None]
    if n_seeds > 1:
        per_seed = (_draw_counts(rng, n_seeds, resamples) * per_seed).sum(axis=1) / n_seeds
    means = per_seed.reshape(resamples, -1).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    mean = float(data.mean())
    # Percentiles of resampled means can miss the sample mean by rounding on tiny samples.
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)), n_groups)


def _draw_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of ``n`` units is drawn in each resample (``resamples`` x ``n``)."""
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


def verdict(difference: Estimate) -> str:
    """ "better" / "worse" when the paired 95% CI excludes 0, else "no significant difference";
    :data:`UNDETERMINED` when it resampled a single video (its CI is a point)."""
    if difference.groups is not None and difference.groups < 2:
        return UNDETERMINED
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "no significant difference"


@dataclass(frozen=True)
class MethodSummary:
    """A method's means with CIs, and its paired differences to each reference method.

    Attributes:
        n: test images; videos: the test videos among them; seeds: training seeds evaluated.
        metrics: metric -> mean over seeds with the video-level CI (what verdicts use).
        paired: reference method (see :data:`REFERENCES`) -> metric -> mean of the per-image
            difference ``method - reference`` with its video-level CI (on the shared images;
            a reference with several seeds enters as its per-image mean over seeds).
        image_metrics / image_paired: the same with the image-level CI (frames as if
            independent), reported beside the video-level one.
        per_seed: seed -> metric -> that seed's mean over the images (one entry for a method
            that does not learn).
    """

    method: str
    n: int
    metrics: dict[str, Estimate]
    paired: dict[str, dict[str, Estimate]]
    image_metrics: dict[str, Estimate]
    image_paired: dict[str, dict[str, Estimate]]
    videos: int = 0
    per_seed: dict[int, dict[str, float]] | None = None

    @property
    def vs_baseline(self) -> dict[str, Estimate]:
        return self.paired.get("baseline", {})

    @property
    def seeds(self) -> int:
        return len(self.per_seed or {0: {}})


class _Table:
    """One method's rows as a seeds x images matrix per metric (images sorted by id)."""

    def __init__(self, rows: Sequence[ImageResult]) -> None:
        by_seed: dict[int, dict[str, ImageResult]] = {}
        for row in rows:
            by_seed.setdefault(row.seed, {})[row.image_id] = row
        self.seeds = sorted(by_seed)
        self.ids = sorted(set.intersection(*(set(r) for r in by_seed.values())))
        self.by_seed = by_seed

    def matrix(self, metric: str, ids: Sequence[str]) -> np.ndarray:
        return np.array(
            [[getattr(self.by_seed[s][i], metric) for i in ids] for s in self.seeds], np.float64
        )


def paired_difference(
    results: Iterable[ImageResult],
    reference: Iterable[ImageResult],
    *,
    groups: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Metric -> mean per-image difference ``results - reference`` with its bootstrap CI, over
    the image ids both hold (empty when they share none). ``groups``: image id -> video (the
    CI resamples videos; ``None``: images)."""
    mine, theirs = _Table(list(results)), _Table(list(reference))
    shared = sorted(set(mine.ids) & set(theirs.ids))
    if not shared:
        return {}
    labels = None if groups is None else [groups[i] for i in shared]
    return {
        name: bootstrap_mean(
            mine.matrix(name, shared) - theirs.matrix(name, shared).mean(axis=0),
            groups=labels,
            seed=seed,
        )
        for name in METRIC_NAMES
    }


def summarise(
    rows: Iterable[ImageResult],
    *,
    groups: Mapping[str, str] | None = None,
    seed: int = 0,
    references: Sequence[str] = REFERENCES,
) -> dict[str, MethodSummary]:
    """Per-method summaries (in the order methods first appear in ``rows``), with paired
    differences to every reference method present. ``groups``: image id -> video, for the
    video-level CIs (``None``: both levels are image-level)."""
    by_method: dict[str, list[ImageResult]] = {}
    for row in rows:
        by_method.setdefault(row.method, []).append(row)
    refs = {ref: by_method[ref] for ref in references if ref in by_method}
    return {
        method: _summary(method, method_rows, refs, groups, seed)
        for method, method_rows in by_method.items()
    }


def _summary(
    method: str,
    rows: list[ImageResult],
    references: Mapping[str, list[ImageResult]],
    groups: Mapping[str, str] | None,
    seed: int,
) -> MethodSummary:
    table = _Table(rows)
    videos = table.ids if groups is None else [groups[i] for i in table.ids]
    matrices = {name: table.matrix(name, table.ids) for name in METRIC_NAMES}

    def estimates(level: Sequence[str] | None) -> dict[str, Estimate]:
        return {
            name: bootstrap_mean(matrix, groups=level, seed=seed)
            for name, matrix in matrices.items()
        }

    def differences(level: Mapping[str, str] | None) -> dict[str, dict[str, Estimate]]:
        return {
            ref: paired_difference(rows, ref_rows, groups=level, seed=seed)
            for ref, ref_rows in references.items()
        }

    return MethodSummary(
        method=method,
        n=len(table.ids),
        metrics=estimates(videos),
        paired=differences(groups),
        image_metrics=estimates(None),
        image_paired=differences(None),
        videos=len(set(videos)),
        per_seed={
            s: {name: float(matrix[k].mean()) for name, matrix in matrices.items()}
            for k, s in enumerate(table.seeds)
        },
    )


def ordered(summaries: Mapping[str, MethodSummary]) -> list[MethodSummary]:
    """The summaries in report order (:data:`~orchestrator.evaluation.methods.METHODS`)."""
    return [summaries[m] for m in METHODS if m in summaries]


def best_method(summaries: Mapping[str, MethodSummary]) -> str:
    """The non-oracle method with the highest mean Dice (the baseline if it is the only one)."""
    candidates = [m for m in summaries if not m.startswith("oracle") and m != "baseline"]
    if not candidates:
        return "baseline"
    return max(candidates, key=lambda m: (summaries[m].metrics["dice"].mean, m))
