"""bnlab.nn.merge: Chan's merge equals the statistics of the union, on scalars and tensors."""

from __future__ import annotations

import numpy as np
import torch

from bnlab.nn.merge import merge_moments


def _summary(values: np.ndarray) -> tuple[float, float, float]:
    return len(values), values.mean(), ((values - values.mean()) ** 2).sum()


def test_merging_two_summaries_gives_the_summary_of_the_union():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shift, scale = rng.uniform(-1e4, 1e4), 10 ** rng.uniform(-3, 3)
        a = shift + scale * rng.standard_normal(rng.integers(1, 30))
        b = shift + scale * rng.standard_normal(rng.integers(1, 30)) + rng.uniform(-5, 5) * scale
        n, mean, m2 = merge_moments(*_summary(a), *_summary(b))
        want = _summary(np.concatenate([a, b]))
        assert n == want[0]
        assert np.isclose(mean, want[1], rtol=1e-12, atol=1e-9 * scale)
        assert np.isclose(m2, want[2], rtol=1e-9, atol=1e-9 * scale**2)


def test_a_tree_of_merges_in_any_order_matches_one_pass():
    rng = np.random.default_rng(1)
    x = 1e4 + rng.standard_normal(1000)
    parts = [_summary(p) for p in np.array_split(x, 7)]
    forward, backward = parts[0], parts[-1]
    for p in parts[1:]:
        forward = merge_moments(*forward, *p)
    for p in reversed(parts[:-1]):
        backward = merge_moments(*backward, *p)
    for got in (forward, backward):
        assert got[0] == 1000
        assert np.isclose(got[2] / 1000, x.var(), rtol=1e-10)


def test_an_empty_part_changes_nothing_and_two_empties_stay_empty():
    assert merge_moments(3, 2.0, 5.0, 0, 0.0, 0.0) == (3, 2.0, 5.0)
    assert merge_moments(0.0, 0.0, 0.0, 0.0, 0.0, 0.0) == (0.0, 0.0, 0.0)  # no 0/0
    assert merge_moments(0, 0.0, 0.0, 4, 1.5, 2.0) == (4, 1.5, 2.0)


def test_per_channel_tensors_merge_like_scalars_and_float32_stays_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g) * 4 + 100
    parts = [x[:4], x[4:]]
    sums = [(len(p), p.mean(0), ((p - p.mean(0)) ** 2).sum(0)) for p in parts]
    n, mean, m2 = merge_moments(*sums[0], *sums[1])
    assert n == 10 and mean.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2 / n, x.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
