"""Bootstrap intervals, the one way the testbed states its uncertainty (scipy's percentile bootstrap).

Images are the resampled unit: an image's items move together, and settings measured on the same
images are compared on the same resamples (same seed, same count), so their differences are paired.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95


def interval(
    samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile bootstrap interval of ``statistic`` over the last axis of ``samples`` (paired).

    ``statistic(*samples, axis=-1)`` may return one value or a vector (one per metric).
    """
    result = stats.bootstrap(
        tuple(samples), statistic, paired=True, vectorized=True, axis=-1, n_resamples=resamples,
        method="percentile", confidence_level=LEVEL, random_state=np.random.default_rng(seed),
    )
    return np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``values`` (e.g. hits of an accuracy)."""
    values = np.asarray(values, dtype=float)
    if values.min() == values.max():  # every resample has the same mean
        return float(values[0]), float(values[0])
    low, high = interval((values,), np.mean, resamples, seed)
    return float(low), float(high)


def pooled_ratio(totals: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """``sum(totals) / sum(counts)`` along ``axis``: a share pooled over the resampled images."""
    return totals.sum(axis=axis) / counts.sum(axis=axis)


def pooled_difference(reference: np.ndarray, totals: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """The pooled share of ``reference`` minus that of ``totals``, over the same images."""
    return pooled_ratio(reference, counts, axis) - pooled_ratio(totals, counts, axis)
