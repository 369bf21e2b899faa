"""How sure an accuracy is: bootstrap intervals over a split's images.

A split's accuracy is the mean of one 0/1 outcome per image, so resampling its images with
replacement (the bootstrap) draws the number of hits from Binomial(n, hits / n); two runs
scored on the same images resample image pairs, whose four outcomes (both right, only the
first, only the second, neither) are drawn from a multinomial. Both are sampled exactly that
way here: the same distribution as resampling the images one by one, at a fraction of the
cost. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # the intervals' coverage
RESAMPLES = 10_000


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def accuracy_interval(
    correct: Sequence[int | bool], *, level: float = LEVEL, resamples: int = RESAMPLES, seed=0
) -> tuple[float, float] | None:
    """Returns the percentile-bootstrap interval (lo, hi) of the accuracy of these per-image
    outcomes (1 right, 0 wrong); None without images."""
    outcomes = np.asarray(correct, dtype=bool)
    n = outcomes.size
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    hits = rng.binomial(n, outcomes.mean(), size=resamples)
    return _bounds(hits / n, level)


@dataclass(frozen=True)
class Difference:
    """Accuracy of a minus accuracy of b on the same images, with its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    images: int

    @property
    def within_noise(self) -> bool:
        """True when the interval holds 0: the data cannot tell the two apart."""
        return self.lo <= 0 <= self.hi


def paired_difference(
    correct_a: Sequence[int | bool],
    correct_b: Sequence[int | bool],
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed=0,
) -> Difference:
    """Returns the difference in accuracy of a and b scored on the same images (position i
    is one image in both; outcomes of several seeds may be concatenated, pair by pair), with
    its paired-bootstrap interval."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired outcomes must be two lists of one length, got {a.shape}, {b.shape}"
        )
    n = a.size
    if n == 0:
        raise ValueError("no images to compare")
    only_a = float(np.mean(a & ~b))
    only_b = float(np.mean(~a & b))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a, only_b, max(0.0, 1 - only_a - only_b)], size=resamples)
    lo, hi = _bounds((draws[:, 0] - draws[:, 1]) / n, level)
    return Difference(only_a - only_b, lo, hi, n)
