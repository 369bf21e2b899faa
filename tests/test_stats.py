"""Bootstrap intervals of accuracies and of paired differences: the shortcut sampling
(binomial, multinomial) agrees with resampling the images one by one."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_core import stats


def _naive_interval(correct, resamples=4000, seed=1):
    rng = np.random.default_rng(seed)
    a = np.asarray(correct, dtype=float)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    return np.percentile(a[idx].mean(1), [2.5, 97.5])


def _naive_difference(a, b, resamples=4000, seed=1):
    rng = np.random.default_rng(seed)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    return np.percentile(d[idx].mean(1), [2.5, 97.5])


def test_an_accuracy_interval_holds_the_accuracy_and_matches_the_image_bootstrap():
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.7
    lo, hi = stats.accuracy_interval(correct)
    assert lo < correct.mean() < hi
    naive_lo, naive_hi = _naive_interval(correct)
    assert abs(lo - naive_lo) < 0.015 and abs(hi - naive_hi) < 0.015
    assert stats.accuracy_interval(correct) == (lo, hi)  # deterministic for a seed
    small = stats.accuracy_interval(correct[:40])
    assert small[1] - small[0] > 2 * (hi - lo)  # ten times fewer images: wider
    assert stats.accuracy_interval([]) is None


def test_a_paired_difference_calls_noise_noise_and_a_real_gap_a_gap():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.8
    same = stats.paired_difference(a, a)
    assert same.mean == 0 and same.within_noise
    flip = a.copy()
    flip[:3] = ~flip[:3]  # three images differ: inside the noise
    assert stats.paired_difference(a, flip).within_noise
    b = a & (rng.random(500) < 0.6)  # b gets right a subset of a's images: a is better
    gap = stats.paired_difference(a, b)
    assert gap.mean == pytest.approx(a.mean() - b.mean())
    assert not gap.within_noise and gap.lo > 0
    naive_lo, naive_hi = _naive_difference(a, b)
    assert abs(gap.lo - naive_lo) < 0.015 and abs(gap.hi - naive_hi) < 0.015
    with pytest.raises(ValueError):
        stats.paired_difference(a, a[:10])
