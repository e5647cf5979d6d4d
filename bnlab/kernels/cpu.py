"""Batch Normalization kernels for the CPU, written with ``numba.njit(parallel=True)``.

The same algorithm as :mod:`bnlab.kernels.cuda`, laid out for caches instead of warps.
Arrays are flat: ``x[n, c, j]`` is at ``(n * C + c) * HW + j`` (see the CUDA module).

- statistics: ``prange`` over chunks of the batch axis N; inside a chunk the rows
  ``x[n, c, :]`` are visited in memory order, so every byte is read once, sequentially.
  Each row (HW values, in L1) gets an exact two-pass mean and M2, folded into the
  chunk's per-channel summary with Chan's merge; the chunk summaries are merged per
  channel at the end (``prange`` over channels). With HW = 1, (N, C) input, a row is a
  single value and Chan's merge *is* Welford's update.
- Like torch's CPU kernel, sums are accumulated in float64 for float32 input (its
  ``acc_type``); the GPU kernels stay in float32 and rely on Welford/Chan alone.
- normalize and the backward elementwise pass: ``prange`` over rows, a vectorizable
  inner loop over the HW values of a row with the channel's constants hoisted.

Serves notebook 04.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from bnlab.kernels import validate
from bnlab.nn import functional as F
from bnlab.nn.merge import merge_moments

# Chan's merge (bnlab.nn.merge), compiled for the CPU; these kernels accumulate in float64.
_merge = njit(inline="always", cache=True)(merge_moments)

# reassoc lets LLVM vectorize the sums (it may reorder the additions); no other liberty.
_FAST = {"reassoc", "contract"}


@njit(parallel=True, fastmath=_FAST, cache=True)
def _stats_chunks(x, N, C, HW, chunks, cnt, mean, m2):
    """Per-chunk, per-channel (count, mean, M2) of flat x: cnt (chunks,), mean/m2 (chunks, C)."""
    for k in prange(chunks):
        n0, n1 = k * N // chunks, (k + 1) * N // chunks
        seen = 0.0
        if HW == 1:  # (N, C) input: Welford's update, vectorized across the channels
            mk, qk = mean[k], m2[k]
            for n in range(n0, n1):
                xr = x[n * C : (n + 1) * C]
                seen += 1.0
                inv = 1.0 / seen
                for c in range(C):
                    delta = xr[c] - mk[c]
                    mk[c] += delta * inv
                    qk[c] += delta * (xr[c] - mk[c])
            cnt[k] = seen
            continue
        for n in range(n0, n1):
            for c in range(C):
                row = x[(n * C + c) * HW : (n * C + c + 1) * HW]
                s = 0.0
                for j in range(HW):
                    s += row[j]
                row_mean = s / HW
                q = 0.0
                for j in range(HW):
                    d = row[j] - row_mean
                    q += d * d
                # Chan's merge of (seen, mean, m2) with the row's (HW, row_mean, q)
                _, mean[k, c], m2[k, c] = _merge(seen, mean[k, c], m2[k, c], HW, row_mean, q)
            seen += HW
        cnt[k] = seen


@njit(parallel=True, cache=True)
def _merge_chunks(cnt, pmean, pm2, eps, mean, var, invstd):
    """Merge the chunk summaries per channel; write mean, biased var, 1/sqrt(var + eps)."""
    chunks, C = pmean.shape
    for c in prange(C):
        n, mu, q = 0.0, 0.0, 0.0
        for k in range(chunks):
            n, mu, q = _merge(n, mu, q, cnt[k], pmean[k, c], pm2[k, c])
        v = q / n
        mean[c] = mu
        var[c] = v
        invstd[c] = 1.0 / np.sqrt(v + eps)


@njit(parallel=True, fastmath=_FAST, cache=True)
def _normalize(x, C, HW, mean, invstd, weight, bias, y):
    """y = (x - mean) * (invstd * weight) + bias, one row (n, c) per iteration."""
    if HW == 1:  # (N, C) input: a row of the batch per iteration, vectorized across C
        for n in prange(x.shape[0] // C):
            xr, yr = x[n * C : (n + 1) * C], y[n * C : (n + 1) * C]
            for c in range(C):
                yr[c] = (xr[c] - mean[c]) * (invstd[c] * weight[c]) + bias[c]
        return
    for r in prange(x.shape[0] // HW):
        c = r % C
        mu, scale, b = mean[c], invstd[c] * weight[c], bias[c]
        # Row views (not flat indices) let LLVM prove the loop safe to vectorize.
        xr, yr = x[r * HW : (r + 1) * HW], y[r * HW : (r + 1) * HW]
        for j in range(HW):
            yr[j] = (xr[j] - mu) * scale + b


@njit(parallel=True, fastmath=_FAST, cache=True)
def _backward_reduce_chunks(x, dy, N, C, HW, chunks, mean, invstd, pa, pb):
    """Per-chunk, per-channel sum(dy) and sum(dy * x_hat) into pa, pb (chunks, C), float64."""
    for k in prange(chunks):
        if HW == 1:  # (N, C) input: vectorized across the channels
            ak, bk = pa[k], pb[k]
            for n in range(k * N // chunks, (k + 1) * N // chunks):
                xr, gr = x[n * C : (n + 1) * C], dy[n * C : (n + 1) * C]
                for c in range(C):
                    ak[c] += gr[c]
                    bk[c] += gr[c] * (xr[c] - mean[c]) * invstd[c]
            continue
        for n in range(k * N // chunks, (k + 1) * N // chunks):
            for c in range(C):
                mu, istd = mean[c], invstd[c]
                base = (n * C + c) * HW
                xr, gr = x[base : base + HW], dy[base : base + HW]
                a, b = 0.0, 0.0
                for j in range(HW):
                    g = gr[j]
                    a += g
                    b += g * (xr[j] - mu)
                pa[k, c] += a
                pb[k, c] += b * istd


@njit(parallel=True, fastmath=_FAST, cache=True)
def _backward_elementwise(x, dy, C, HW, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_m, dx):
    """dx = weight * invstd * (dy - sum_dy/m - x_hat * sum_dy_xhat/m), one row per iteration."""
    if HW == 1:  # (N, C) input: a row of the batch per iteration, vectorized across C
        for n in prange(x.shape[0] // C):
            lo, hi = n * C, (n + 1) * C
            xr, gr, dxr = x[lo:hi], dy[lo:hi], dx[lo:hi]
            for c in range(C):
                istd = invstd[c]
                xhat = (xr[c] - mean[c]) * istd
                dxr[c] = weight[c] * istd * (gr[c] - (sum_dy[c] + xhat * sum_dy_xhat[c]) * inv_m)
        return
    for r in prange(x.shape[0] // HW):
        c = r % C
        mu, istd = mean[c], invstd[c]
        scale = weight[c] * istd
        a, b = sum_dy[c] * inv_m, sum_dy_xhat[c] * inv_m * istd
        xr, gr, dxr = x[r * HW : (r + 1) * HW], dy[r * HW : (r + 1) * HW], dx[r * HW : (r + 1) * HW]
        for j in range(HW):
            dxr[j] = scale * (gr[j] - a - (xr[j] - mu) * b)


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


_DEVICE = ("cpu", "the CPU kernels need CPU tensors: call .cpu() first")


def _chunks(n: int) -> int:
    # Enough chunks to balance the threads, never more than rows of the batch axis.
    return max(1, min(n, 4 * numba.get_num_threads()))


def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of x (N, C, *): three (C,)."""
    N, C, HW = validate.validate_stats_args(x, eps, _DEVICE)
    k = _chunks(N)
    cnt, pmean, pm2 = np.zeros(k), np.zeros((k, C)), np.zeros((k, C))
    _stats_chunks(_flat(x), N, C, HW, k, cnt, pmean, pm2)
    mean, var, invstd = (torch.empty(C, dtype=x.dtype) for _ in range(3))
    _merge_chunks(cnt, pmean, pm2, eps, mean.numpy(), var.numpy(), invstd.numpy())
    return mean, var, invstd


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel; x (N, C, *), the rest (C,)."""
    C, HW, weight, bias = validate.validate_normalize_args(x, mean, invstd, weight, bias, _DEVICE)
    y = torch.empty_like(x)
    vecs = (t.numpy() for t in (mean, invstd, weight, bias))
    _normalize(_flat(x), C, HW, *vecs, _flat(y))
    return y


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * x_hat): two (C,) tensors (dbeta and dgamma)."""
    N, C, HW = validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    k = _chunks(N)
    pa, pb = np.zeros((k, C)), np.zeros((k, C))
    _backward_reduce_chunks(_flat(x), _flat(dy), N, C, HW, k, mean.numpy(), invstd.numpy(), pa, pb)
    return (torch.from_numpy(p.sum(axis=0)).to(x.dtype) for p in (pa, pb))


def backward_elementwise(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """dx (N, C, *) by the compact formula; ``count`` is m = N * HW, the values per channel.

    With ``sum_dy = sum_dy_xhat = 0`` this is the eval-mode gradient dy * weight * invstd.
    """
    C, HW, weight = validate.validate_backward_elementwise_args(
        dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, _DEVICE
    )
    dx = torch.empty_like(x)
    vecs = (t.numpy() for t in (mean, invstd, weight, sum_dy, sum_dy_xhat))
    _backward_elementwise(_flat(x), _flat(dy), C, HW, *vecs, 1.0 / count, _flat(dx))
    return dx


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """In place; a (C,)-sized update, so it is bnlab.nn.functional's (no kernel to gain from)."""
    validate.validate_running(running_mean, running_var, mean, var)
    F.update_running_stats(running_mean, running_var, mean, var, count, momentum)
