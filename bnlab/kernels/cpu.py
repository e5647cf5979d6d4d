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


# Rows of a 2-D (M, C) input are summed ROWS_IN_TYPE at a time in the input's own type
# (vectorized across C), then added to float64 accumulators: float64 sums, at the speed
# of float32 arithmetic. The error of 8 float32 additions is ~1e-6 relative, before
# the float64 accumulation takes over.
ROWS_IN_TYPE = 8


@njit(fastmath=_FAST, cache=True)
def _rows_moments(x, n0, n1, C, mean_k, m2_k):
    """Per-channel (mean, M2) of rows n0..n1 of a flat (M, C) array, into mean_k, m2_k (C,).

    One pass over shifted values d = x - x[n0] (the chunk's first row, so d is of the
    order of the spread, and sum(d^2) - sum(d)^2 / n does not cancel as sum(x^2) would).
    """
    shift = x[n0 * C : (n0 + 1) * C]
    s, q = np.zeros(C), np.zeros(C)
    sb, qb = np.zeros_like(shift), np.zeros_like(shift)  # the input's type
    for b0 in range(n0, n1, ROWS_IN_TYPE):
        sb[:] = 0.0
        qb[:] = 0.0
        for n in range(b0, min(b0 + ROWS_IN_TYPE, n1)):
            xr = x[n * C : (n + 1) * C]
            for c in range(C):
                d = xr[c] - shift[c]
                sb[c] += d
                qb[c] += d * d
        for c in range(C):
            s[c] += sb[c]
            q[c] += qb[c]
    rows = float(n1 - n0)
    for c in range(C):
        mean_k[c] = shift[c] + s[c] / rows
        m2_k[c] = max(q[c] - s[c] * s[c] / rows, 0.0)


@njit(parallel=True, fastmath=_FAST, cache=True)
def _stats_chunks(x, N, C, HW, chunks, cnt, mean, m2):
    """Per-chunk, per-channel (count, mean, M2) of flat x: cnt (chunks,), mean/m2 (chunks, C)."""
    for k in prange(chunks):
        n0, n1 = k * N // chunks, (k + 1) * N // chunks
        if HW == 1:  # (N, C) rows (2-D input, or channels_last seen as (N*H*W, C))
            _rows_moments(x, n0, n1, C, mean[k], m2[k])
            cnt[k] = n1 - n0
            continue
        seen = 0.0
        for n in range(n0, n1):
            for c in range(C):
                row = x[(n * C + c) * HW : (n * C + c + 1) * HW]
                # One pass over the row, shifted by its first value (d is of the order of
                # the spread, so sum(d^2) - sum(d)^2 / HW does not cancel), in float64.
                shift = 0.0 + row[0]  # float64: the sums below are float64
                s, q = 0.0, 0.0
                for j in range(HW):
                    d = row[j] - shift
                    s += d
                    q += d * d
                row_mean, row_m2 = shift + s / HW, max(q - s * s / HW, 0.0)
                # Chan's merge of (seen, mean, m2) with the row's (HW, row_mean, row_m2)
                _, mean[k, c], m2[k, c] = _merge(seen, mean[k, c], m2[k, c], HW, row_mean, row_m2)
            seen += HW
        cnt[k] = seen


@njit(cache=True)
def _merge_chunks(cnt, pmean, pm2, mean, var):
    """Merge the chunk summaries per channel into float64 mean and biased var (C,)."""
    chunks, C = pmean.shape
    for c in range(C):
        n, mu, q = 0.0, 0.0, 0.0
        for k in range(chunks):
            n, mu, q = _merge(n, mu, q, cnt[k], pmean[k, c], pm2[k, c])
        mean[c] = mu
        var[c] = q / n


@njit(cache=True)
def _affine_constants(mean, invstd, weight, bias, scale, shift):
    """y = x * scale + shift: scale = weight * invstd, shift = bias - mean * scale (float64),
    the form torch's CPU kernel uses, one multiply-add per value."""
    for c in range(mean.shape[0]):
        sc = weight[c] * invstd[c]
        scale[c] = sc
        shift[c] = bias[c] - mean[c] * sc


@njit(cache=True)
def _train_constants(
    cnt, pmean, pm2, eps, weight, bias, momentum, rmean, rvar, mean, invstd, scale, shift
):
    """The training forward's per-channel step, one serial loop over C (no thread launch):
    merge the chunk summaries; mean, invstd (float64); scale and shift for y = x * scale +
    shift (x's type); and, when the running buffers are not empty, PyTorch's update
    ``running = (1 - momentum) * running + momentum * batch`` in float64 with the unbiased
    variance. Writes mean, invstd (float64) and scale, shift (x's type), all (C,)."""
    _merge_chunks(cnt, pmean, pm2, mean, invstd)  # invstd holds the biased variance first
    unbias = cnt.sum() / (cnt.sum() - 1.0)
    for c in range(mean.shape[0]):
        var = invstd[c]
        invstd[c] = 1.0 / np.sqrt(var + eps)
        if rmean.shape[0]:
            rmean[c] = momentum * mean[c] + (1.0 - momentum) * rmean[c]
            rvar[c] = momentum * (var * unbias) + (1.0 - momentum) * rvar[c]
    _affine_constants(mean, invstd, weight, bias, scale, shift)


@njit(parallel=True, fastmath=_FAST, cache=True)
def _affine(x, C, HW, scale, shift, relu, y):
    """y = x * scale + shift per channel, one row per iteration; with ``relu``, values
    below zero become zero (NaN stays NaN, as torch.relu), in the same loop."""
    zero = scale.dtype.type(0)  # x's type: a float64 literal would widen the loop
    if HW == 1:  # (N, C) rows: a row per iteration, vectorized across C
        for n in prange(x.shape[0] // C):
            xr, yr = x[n * C : (n + 1) * C], y[n * C : (n + 1) * C]
            if relu:
                for c in range(C):
                    v = xr[c] * scale[c] + shift[c]
                    yr[c] = zero if v < zero else v
            else:
                for c in range(C):
                    yr[c] = xr[c] * scale[c] + shift[c]
        return
    for r in prange(x.shape[0] // HW):
        c = r % C
        a, b = scale[c], shift[c]
        # Row views (not flat indices) let LLVM prove the loop safe to vectorize.
        xr, yr = x[r * HW : (r + 1) * HW], y[r * HW : (r + 1) * HW]
        if relu:
            for j in range(HW):
                v = xr[j] * a + b
                yr[j] = zero if v < zero else v
        else:
            for j in range(HW):
                yr[j] = xr[j] * a + b


@njit(fastmath=_FAST, cache=True)
def _rows_backward_sums(x, dy, n0, n1, C, mean, a_k, b_k):
    """sum(dy) and sum(dy * (x - mean)) per channel over rows n0..n1 of flat (M, C) arrays,
    ROWS_IN_TYPE rows at a time in the input's type, then in float64."""
    mu = mean.astype(x.dtype)
    a, b = np.zeros(C), np.zeros(C)
    ab, bb = np.zeros_like(mu), np.zeros_like(mu)
    for b0 in range(n0, n1, ROWS_IN_TYPE):
        ab[:] = 0.0
        bb[:] = 0.0
        for n in range(b0, min(b0 + ROWS_IN_TYPE, n1)):
            xr, gr = x[n * C : (n + 1) * C], dy[n * C : (n + 1) * C]
            for c in range(C):
                g = gr[c]
                ab[c] += g
                bb[c] += g * (xr[c] - mu[c])
        for c in range(C):
            a[c] += ab[c]
            b[c] += bb[c]
    a_k[:] = a
    b_k[:] = b


@njit(parallel=True, fastmath=_FAST, cache=True)
def _backward_reduce_chunks(x, dy, N, C, HW, chunks, mean, pa, pb):
    """Per-chunk, per-channel sum(dy) and sum(dy * (x - mean)) into pa, pb (chunks, C), float64."""
    for k in prange(chunks):
        n0, n1 = k * N // chunks, (k + 1) * N // chunks
        if HW == 1:
            _rows_backward_sums(x, dy, n0, n1, C, mean, pa[k], pb[k])
            continue
        for n in range(n0, n1):
            for c in range(C):
                mu = mean[c]
                base = (n * C + c) * HW
                xr, gr = x[base : base + HW], dy[base : base + HW]
                a, b = 0.0, 0.0
                for j in range(HW):
                    g = gr[j]
                    a += g
                    b += g * (xr[j] - mu)
                pa[k, c] += a
                pb[k, c] += b


@njit(cache=True)
def _backward_constants(pa, pb, mean, invstd, weight, count, batch_stats, sums, coef):
    """Chunk sums -> sums (2, C): sum(dy), sum(dy * x_hat); coef (4, C) for dx (both in
    the arrays' own types, so float32 results need no conversion afterwards):
    dx = (dy - a - (x - mean) * b) * scale, a = sum(dy)/m, b = sum(dy * x_hat) * invstd/m,
    scale = weight * invstd; a = b = 0 for running statistics (``batch_stats`` False)."""
    chunks, C = pa.shape
    for c in range(C):
        sa, sb = 0.0, 0.0
        for k in range(chunks):
            sa += pa[k, c]
            sb += pb[k, c]
        istd = invstd[c]
        sums[0, c], sums[1, c] = sa, sb * istd
        coef[0, c] = mean[c]
        coef[1, c] = sa / count if batch_stats else 0.0
        coef[2, c] = sb * istd * istd / count if batch_stats else 0.0
        coef[3, c] = weight[c] * istd


@njit(parallel=True, fastmath=_FAST, cache=True)
def _backward_dx(x, dy, C, HW, mean, a, b, scale, dx):
    """dx = (dy - a - (x - mean) * b) * scale per channel, one row per iteration."""
    if HW == 1:  # (N, C) rows, vectorized across C
        for n in prange(x.shape[0] // C):
            lo, hi = n * C, (n + 1) * C
            xr, gr, dxr = x[lo:hi], dy[lo:hi], dx[lo:hi]
            for c in range(C):
                dxr[c] = (gr[c] - a[c] - (xr[c] - mean[c]) * b[c]) * scale[c]
        return
    for r in prange(x.shape[0] // HW):
        c = r % C
        mu, ac, bc, sc = mean[c], a[c], b[c], scale[c]
        xr, gr, dxr = x[r * HW : (r + 1) * HW], dy[r * HW : (r + 1) * HW], dx[r * HW : (r + 1) * HW]
        for j in range(HW):
            dxr[j] = (gr[j] - ac - (xr[j] - mu) * bc) * sc


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


_DEVICE = ("cpu", "the CPU kernels need CPU tensors: call .cpu() first")


def _chunks(n: int) -> int:
    # Two chunks per thread balance the (equal-sized) rows; more would only add merges,
    # C per chunk, which is what a small input such as (1024, 512) pays for. Never more
    # chunks than rows of the batch axis.
    return max(1, min(n, 2 * numba.get_num_threads()))


def _moments(x: Tensor, N: int, C: int, HW: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-channel mean and biased variance of x, from the chunked kernels."""
    k = _chunks(N)
    cnt, pmean, pm2 = np.zeros(k), np.zeros((k, C)), np.zeros((k, C))
    _stats_chunks(_flat(x), N, C, HW, k, cnt, pmean, pm2)
    mean, var = np.empty(C), np.empty(C)
    _merge_chunks(cnt, pmean, pm2, mean, var)
    return mean, var


def _vector(t: Tensor | None, c: int, fill: float, dtype=np.float64) -> np.ndarray:
    """A (C,) parameter as NumPy, or ``fill`` for a missing one (affine=False)."""
    return np.full(c, fill, dtype) if t is None else t.detach().numpy()


def _affine_into(x: Tensor, C: int, HW: int, mean, invstd, weight, bias, relu: bool) -> Tensor:
    """y = x * scale + shift per channel (then ReLU when ``relu``), from float64 (C,) arrays."""
    scale, shift = np.empty(C), np.empty(C)
    _affine_constants(mean, invstd, _vector(weight, C, 1.0), _vector(bias, C, 0.0), scale, shift)
    y = torch.empty_like(x)
    if x.dtype == torch.float32:  # the inner loop in float32, as torch's
        scale, shift = scale.astype(np.float32), shift.astype(np.float32)
    _affine(_flat(x), C, HW, scale, shift, relu, _flat(y))
    return y


def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of x (N, C, *): three (C,)."""
    N, C, HW = validate.validate_stats_args(x, eps, _DEVICE)
    mean, var = _moments(x, N, C, HW)
    invstd = 1.0 / np.sqrt(var + eps)
    return tuple(torch.from_numpy(v).to(x.dtype) for v in (mean, var, invstd))


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel; x (N, C, *), the rest (C,).

    Computed as x * scale + shift (scale = invstd * weight, shift = bias - mean * scale),
    the form torch's CPU kernel uses: one multiply-add per value.
    """
    C, HW, weight, bias = validate.validate_normalize_args(x, mean, invstd, weight, bias, _DEVICE)
    mean, invstd = mean.double().numpy(), invstd.double().numpy()
    return _affine_into(x, C, HW, mean, invstd, weight, bias, False)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * x_hat): two (C,) tensors (dbeta and dgamma)."""
    N, C, HW = validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    sums, _ = _backward_sums(
        dy, x, N, C, HW, mean.double().numpy(), invstd.double().numpy(), None, True
    )
    return torch.from_numpy(sums[0]), torch.from_numpy(sums[1])


def _backward_sums(dy, x, N, C, HW, mean, invstd, weight, batch_stats: bool):
    """(sum(dy), sum(dy * x_hat)) as a (2, C) array and dx's coefficients (4, C), x's type."""
    k = _chunks(N)
    pa, pb = np.zeros((k, C)), np.zeros((k, C))
    xf, gf = x.detach().numpy().reshape(-1), dy.detach().numpy().reshape(-1)
    _backward_reduce_chunks(xf, gf, N, C, HW, k, mean, pa, pb)
    sums, coef = np.empty((2, C), xf.dtype), np.empty((4, C), xf.dtype)
    count = float(N * HW)
    w = _vector(weight, C, 1.0, xf.dtype)
    _backward_constants(pa, pb, mean, invstd, w, count, batch_stats, sums, coef)
    return sums, coef


def _dx(dy: Tensor, x: Tensor, C: int, HW: int, coef: np.ndarray) -> Tensor:
    dx = torch.empty_like(x)
    xf, gf = x.detach().numpy().reshape(-1), dy.detach().numpy().reshape(-1)
    _backward_dx(xf, gf, C, HW, coef[0], coef[1], coef[2], coef[3], dx.numpy().reshape(-1))
    return dx


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
    istd = invstd.double()
    coef = torch.stack(
        [
            mean.double(),
            sum_dy.double() / count,
            sum_dy_xhat.double() * istd / count,
            weight.double() * istd,
        ]
    )
    return _dx(dy, x, C, HW, coef.to(x.dtype).numpy())


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


# ---------------------------------------------------------------------------------
# Fused operations, one call each for the autograd Function (bnlab.kernels.autograd):
# a forward pass or a backward pass with as few kernel launches and (C,)-sized torch
# operations as possible, which is what a small input such as (1024, 512) pays for.
# ---------------------------------------------------------------------------------


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: y, and the (mean, invstd) the backward needs (float64 here).

    The running buffers (or None) are updated in place with PyTorch's rule, computed in
    float64 like torch's CPU kernel; 3 passes over x: statistics, then read x, write y.
    """
    N, C, HW = validate.validate_forward_args(
        x,
        eps,
        _DEVICE,
        True,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    k = _chunks(N)
    cnt, pmean, pm2 = np.zeros(k), np.zeros((k, C)), np.zeros((k, C))
    xf = x.detach().numpy().reshape(-1)
    _stats_chunks(xf, N, C, HW, k, cnt, pmean, pm2)
    mean, invstd = np.empty(C), np.empty(C)
    np_dtype = xf.dtype
    scale, shift = np.empty(C, np_dtype), np.empty(C, np_dtype)
    w, b = _vector(weight, C, 1.0, np_dtype), _vector(bias, C, 0.0, np_dtype)
    if running_mean is None:
        rm = rv = np.empty(0, np_dtype)
    else:
        rm, rv = running_mean.numpy(), running_var.numpy()
    _train_constants(cnt, pmean, pm2, eps, w, b, momentum, rm, rv, mean, invstd, scale, shift)
    y = torch.empty_like(x)
    _affine(xf, C, HW, scale, shift, False, y.numpy().reshape(-1))
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


def forward_eval(x, running_mean, running_var, weight, bias, eps, relu: bool = False):
    """Eval forward from the running statistics: y = x * scale + shift, and optionally ReLU
    fused into the same pass (2 passes: read x, write y). Returns y, mean, invstd (float64)."""
    _, C, HW = validate.validate_forward_args(
        x,
        eps,
        _DEVICE,
        False,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    mean = running_mean.double().numpy().copy()  # a snapshot: the backward reads it later
    invstd = 1.0 / np.sqrt(running_var.double().numpy() + eps)
    y = _affine_into(x, C, HW, mean, invstd, weight, bias, relu)
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


def backward_train(dy, x, mean, invstd, weight, batch_stats: bool = True):
    """dx, sum(dy * x_hat) (dgamma) and sum(dy) (dbeta) in 5 passes: read x and dy for the
    two sums, then read x and dy and write dx. ``batch_stats`` False: the eval-mode
    gradient (statistics are constants), dx = dy * weight * invstd."""
    N, C, HW = validate.validate_inputs(x, *(() if weight is None else (("weight", weight),)))
    validate.validate_like(dy, x, "grad_output")
    sums, coef = _backward_sums(dy, x, N, C, HW, mean.numpy(), invstd.numpy(), weight, batch_stats)
    return _dx(dy, x, C, HW, coef), torch.from_numpy(sums[1]), torch.from_numpy(sums[0])
