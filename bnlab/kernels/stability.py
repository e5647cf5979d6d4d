"""Catastrophic cancellation: why the kernels use Welford/Chan and not E[x^2] - E[x]^2.

With mean 1e4 and std 1, E[x^2] is about 1e8, where float32 spacing is 8: the
difference with E[x]^2 (also about 1e8) keeps almost no correct digit of a variance
of 1. Welford's update and Chan's merge only ever subtract numbers of the size of the
spread. In float32 (the CUDA kernels) the running mean is still rounded to float32's
spacing near 1e4 (about 1e-3), which leaves a relative error of order 1e-4 on a
variance of 1; accumulated in float64 (the CPU kernel, like torch's) it is near 1e-7.
Notebook 04 measures all three.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.nn.functional import batch_stats, reduce_dims


def shifted_data(
    shape: tuple[int, ...] = (8, 2, 16, 16), mean: float = 1e4, std: float = 1.0, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """float32 data of the given per-channel mean and std, and its exact (float64) variance.

    Returns ``(x, var)``: x (N, C, *) float32; var (C,) float64, the biased variance of
    the float32 values themselves, so any error is the algorithm's, not the rounding of x.
    """
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float()
    return x, batch_stats(x.double())[1]


def naive_variance(x: Tensor) -> Tensor:
    """The one-pass textbook formula E[x^2] - E[x]^2 per channel, in x's own dtype: (C,)."""
    dims = reduce_dims(x)
    return (x * x).mean(dim=dims) - x.mean(dim=dims) ** 2


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    """max |estimate - exact| / |exact| over channels, computed in float64."""
    e, t = estimate.double(), exact.double()
    return float(((e - t).abs() / t.abs()).max())
