"""Batch Normalization kernels for the CPU, written with ``numba.njit``: channel-blocked.

The same algorithm as :mod:`bnlab.kernels.cuda`, laid out for caches instead of warps.
Arrays are flat: ``x[n, c, j]`` is at ``(n * C + c) * HW + j``, a *row* being the HW
values of one sample and one channel.

**NCHW, channel blocking.** A training forward must see every value of a channel before it
can normalize any, so a naive kernel reads x twice from memory (statistics, then normalize)
and writes y once. Here the channels are cut into groups small enough that a group's slab
(its N rows per channel, and dy's in the backward) stays in one core's L2 cache between its
reduction and its second pass (:func:`channel_group`). Each thread takes whole groups, reduces
one and at once normalizes it (forward) or computes its dx (backward), so from main memory:

- forward: read x, write y: 2 passes (the re-read comes from cache);
- backward: read x and dy, write dx: 3 passes; 5 for a training step.

**Rows, (M, C).** A 2-D input, or a channels_last tensor seen as its ``(N*H*W, C)`` view, has
every channel spread over all of memory: no group of channels is contiguous, so it cannot
be blocked by channel. Threads take blocks of rows (a two-level reduction: rows within a
block, vectorized across C, then the blocks' partial sums), then normalize their rows. Its
minimum traffic is 3 passes forward (read x twice, write y) and 5 backward (read x and dy
twice, write dx), unless the whole tensor fits in the last-level cache.

**Precision.** Sums run in the input's type along a row (or over 8 rows of a (M, C) block),
at most RUN values at a time, and in float64 across rows: the vector units work in float32,
and the rounding of a float32 run of at most RUN values is ~1e-7 relative before the float64
accumulation takes over. Values are shifted first (by the mean of the channel's first row,
or the first row itself for (M, C)), so the variance sum(d^2)/m - (sum(d)/m)^2 subtracts
numbers of the size of the spread, never of the mean (see :mod:`bnlab.kernels.stability`).
The output is ``(x - mean) * scale + beta``, not ``x * scale + shift``: the fused form
cancels when |mean| * scale is large (a constant channel of -1e4 would come out 0.4 away
from beta); here it comes out exactly beta. The float64 mean is split into its float32
value and the remainder, and the remainder is folded into beta, so the subtraction in the
input's type loses nothing.

**One dispatch per phase.** The training forward and the backward are one compiled call
each, which allocates its own scratch; arguments are validated once, by the public
function. Below SERIAL_BELOW_BLOCKED (NCHW) or SERIAL_BELOW_ROWS ((M, C)) values a serial
build of the same code runs (no parallel region: starting one costs more than it saves).
The Numba threading layer is pinned when this module is imported (THREADING_LAYER) and
reported by :func:`threading_layer`.

Serves notebook 04.
"""

from __future__ import annotations

import functools
import os
import types

import numba

# Pinned before the first parallel call, which is when Numba loads its thread pool; an
# explicit NUMBA_THREADING_LAYER in the environment wins. "omp" (GNU OpenMP, a pool of its
# own beside torch's) starts a region in ~2 us on 2 cores, "workqueue" in ~25 us (its
# workers sleep between regions). Alternating a torch matmul with the kernel's fwd+bwd
# (2 threads), the kernel took 0.55-0.6x torch's BN time with "omp" and 1.0-1.8x with
# "workqueue", while the torch op alone took the same time under either: omp contends less.
THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER") or "omp"
numba.config.THREADING_LAYER = THREADING_LAYER

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402
from torch import Tensor  # noqa: E402

from bnlab.kernels import validate  # noqa: E402
from bnlab.kernels.machine import CacheSizes, cache_sizes  # noqa: E402
from bnlab.nn import functional as F  # noqa: E402

__all__ = [
    "backward_elementwise",
    "backward_reduce",
    "backward_train",
    "cache_sizes",
    "channel_group",
    "channel_stats",
    "forward_eval",
    "forward_train",
    "normalize",
    "plan",
    "threading_layer",
    "update_running_stats",
]

# reassoc lets LLVM vectorize the sums (it may reorder the additions); contract allows
# fused multiply-adds. No other liberty: NaN and inf keep their meaning (ReLU keeps NaN).
_FAST = {"reassoc", "contract"}
# Values summed in the input's type before the float64 accumulator takes over.
RUN = 2048
# Rows of a (M, C) block summed in the input's type, vectorized across C.
ROWS_IN_TYPE = 8
# Below these many values per tensor the serial build runs. Measured with 2 threads on the
# 2-core development machine (fwd+bwd, serial time / parallel time, interleaved, under load):
# NCHW, one parallel region per phase: 1.07 at 4096 values, 1.15 at 8192, 1.3 at 32768;
# (M, C) rows, two regions per phase: 0.81 at 16384, 0.88 at 65536, 1.2 at 131072.
SERIAL_BELOW_BLOCKED = 1 << 12
SERIAL_BELOW_ROWS = 1 << 17
# A group's slab may fill this share of one core's L2: the rest holds the output being
# written (y or dx), the per-channel constants and what the hardware prefetches.
L2_SHARE = 0.5


# Only the explicit ``prange`` loops run on the thread pool. By default Numba would also turn
# every array expression of a parallel function (np.zeros, .sum(), .astype) into a parallel
# region of its own, each costing a thread-pool start (~15 us on 2 cores).
PRANGE_ONLY = {
    "prange": True,
    "comprehension": False,
    "reduction": False,
    "inplace_binop": False,
    "setitem": False,
    "numpy": False,
    "stencil": False,
    "fusion": False,
}


def _compiled_twice(py_func):
    """(parallel, serial) dispatchers of one Python function: ``prange`` runs on the thread
    pool in the first and is a plain ``range`` in the second. The serial copy gets its own
    name, so that Numba's on-disk cache keeps the two builds apart."""
    serial = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial")
    serial.__qualname__ = py_func.__qualname__ + "_serial"
    serial.__doc__ = py_func.__doc__
    return (
        njit(parallel=dict(PRANGE_ONLY), fastmath=_FAST, cache=True)(py_func),  # numba pops keys
        njit(fastmath=_FAST, cache=True)(serial),
    )


# ---------------------------------------------------------------------------------
# Row-level pieces (inlined into the entries below)
# ---------------------------------------------------------------------------------


@njit(fastmath=_FAST, cache=True, inline="always")
def _row_sums(row, shift):
    """float64 sum(d) and sum(d * d) of d = row - shift (row's type), RUN values at a time
    in row's type (vectorized), then in float64."""
    zero = row.dtype.type(0)
    s, q = 0.0, 0.0
    for j0 in range(0, row.shape[0], RUN):
        run = row[j0 : j0 + RUN]  # indices from 0: LLVM then vectorizes without gathers
        rs, rq = zero, zero
        for j in range(run.shape[0]):
            d = run[j] - shift
            rs += d
            rq += d * d
        s += rs
        q += rq
    return s, q


@njit(fastmath=_FAST, cache=True, inline="always")
def _row_grad_sums(row, grad, centre):
    """float64 sum(g) and sum(g * (row - centre)), RUN values at a time in row's type."""
    zero = row.dtype.type(0)
    a, b = 0.0, 0.0
    for j0 in range(0, row.shape[0], RUN):
        run, grun = row[j0 : j0 + RUN], grad[j0 : j0 + RUN]
        ra, rb = zero, zero
        for j in range(run.shape[0]):
            g = grun[j]
            ra += g
            rb += g * (run[j] - centre)
        a += ra
        b += rb
    return a, b


@njit(fastmath=_FAST, cache=True, inline="always")
def _normalize_row(row, out, centre, scale, beta, relu):
    """out = (row - centre) * scale + beta; with ``relu`` values below zero become zero
    (NaN stays NaN, as torch.relu)."""
    zero = row.dtype.type(0)
    if relu:
        for j in range(row.shape[0]):
            v = (row[j] - centre) * scale + beta
            out[j] = zero if v < zero else v
    else:
        for j in range(row.shape[0]):
            out[j] = (row[j] - centre) * scale + beta


@njit(fastmath=_FAST, cache=True, inline="always")
def _dx_row(row, grad, out, centre, k_x, k_dy, k_0):
    """out = (row - centre) * k_x + grad * k_dy + k_0: dx by the compact formula, its
    per-channel constants folded (see _grad_constants). With k_x = 0 (running statistics)
    x is not read, so an inf in x does not turn dx into NaN (torch's dy * weight * invstd)."""
    if k_x == 0:
        for j in range(row.shape[0]):
            out[j] = grad[j] * k_dy + k_0
        return
    for j in range(row.shape[0]):
        out[j] = (row[j] - centre) * k_x + grad[j] * k_dy + k_0


# ---------------------------------------------------------------------------------
# Per-channel constants, in float64, from the partial sums: one call per group of
# channels, looping over them. (Called once per channel, even inlined, the same code
# took ~0.2 us per channel, 100 us at C = 512, more than the whole (1024, 512) forward's
# memory traffic; as one loop it takes ~10 us.)
# ---------------------------------------------------------------------------------


@njit(cache=True)
def _train_constants(
    c0, c1, s, q, shift, count, w, b, momentum, eps, rmean, rvar, mean, invstd, centre, scale, beta
):
    """Channels c0..c1: mean and invstd from the shifted sums s = sum(d), q = sum(d^2) over
    ``count`` values (s, q (parts, C): the columns' partial sums are added here);
    PyTorch's running update (unbiased variance) when the buffers are not empty; and the
    normalize constants in x's type (_affine_constants)."""
    for c in range(c0, c1):
        sc, qc = 0.0, 0.0
        for t in range(s.shape[0]):
            sc += s[t, c]
            qc += q[t, c]
        d_mean = sc / count
        var = max(qc / count - d_mean * d_mean, 0.0)
        mu = float(shift[c]) + d_mean
        istd = 1.0 / np.sqrt(var + eps)
        mean[c] = mu
        invstd[c] = istd
        if rmean.shape[0]:
            rmean[c] = momentum * mu + (1.0 - momentum) * rmean[c]
            rvar[c] = momentum * (var * count / (count - 1.0)) + (1.0 - momentum) * rvar[c]
        _affine_constants(c, mu, istd, w, b, centre, scale, beta)


@njit(cache=True, inline="always")
def _affine_constants(c, mu, istd, w, b, centre, scale, beta):
    """centre[c], scale[c], beta[c] (x's type) for y = (x - centre) * scale + beta: centre
    is the mean rounded to x's type, scale = weight * invstd, and beta = bias - (mean -
    centre) * scale takes the rounding's remainder; an empty w or b stands for ones or
    zeros (affine=False)."""
    sc = (w[c] if w.shape[0] else 1.0) * istd
    centre[c] = mu
    scale[c] = sc
    beta[c] = (b[c] if b.shape[0] else 0.0) - (mu - centre[c]) * sc


@njit(cache=True)
def _grad_constants(c0, c1, sa, sb, mean, invstd, w, count, batch_stats, centre, dgamma, dbeta, k):
    """Channels c0..c1, from the partial sums sa = sum(dy), sb = sum(dy * (x - centre))
    ((parts, C), added here): dbeta[c], dgamma[c], and k[:, c] = (k_x, k_dy, k_0) with
    dx = (x - centre) * k_x + dy * k_dy + k_0, which is (dy - sum(dy)/m - x_hat *
    sum(dy * x_hat)/m) * weight * invstd; for running statistics (batch_stats False)
    dx = dy * weight * invstd."""
    for c in range(c0, c1):
        a, bsum = 0.0, 0.0
        for t in range(sa.shape[0]):
            a += sa[t, c]
            bsum += sb[t, c]
        istd = invstd[c]
        sxh = (bsum - (mean[c] - centre[c]) * a) * istd  # sum(dy * x_hat), exact centre
        dbeta[c] = a
        dgamma[c] = sxh
        sc = (w[c] if w.shape[0] else 1.0) * istd
        if batch_stats:
            kb = sxh * istd / count
            k[0, c] = -kb * sc
            k[1, c] = sc
            k[2, c] = (-a / count + kb * (mean[c] - centre[c])) * sc
        else:
            k[0, c] = 0.0
            k[1, c] = sc
            k[2, c] = 0.0


# ---------------------------------------------------------------------------------
# NCHW: one group of channels, both passes while it is in cache
# ---------------------------------------------------------------------------------


@njit(fastmath=_FAST, cache=True)
def _group_sums(x, C, HW, c0, c1, n0, n1, shift, s, q):
    """Add the shifted sums of rows n0..n1 of channels c0..c1 to s, q (C,), in memory order.

    The sums gather in arrays of this call's own and reach s, q once, at the end: threads
    that wrote their neighbours' entries of one shared array row after row would pass the
    cache line holding both back and forth (false sharing)."""
    ls, lq = np.zeros(c1 - c0), np.zeros(c1 - c0)
    for n in range(n0, n1):
        for c in range(c0, c1):
            base = (n * C + c) * HW
            rs, rq = _row_sums(x[base : base + HW], shift[c])
            ls[c - c0] += rs
            lq[c - c0] += rq
    for c in range(c0, c1):
        s[c] += ls[c - c0]
        q[c] += lq[c - c0]


@njit(fastmath=_FAST, cache=True)
def _group_normalize(x, y, C, HW, c0, c1, n0, n1, centre, scale, beta, relu):
    for n in range(n0, n1):
        for c in range(c0, c1):
            base = (n * C + c) * HW
            _normalize_row(
                x[base : base + HW], y[base : base + HW], centre[c], scale[c], beta[c], relu
            )


@njit(fastmath=_FAST, cache=True)
def _group_grad_sums(x, dy, C, HW, c0, c1, n0, n1, centre, sa, sb):
    """Add sum(dy), sum(dy * (x - centre)) of rows n0..n1 of channels c0..c1 to sa, sb (C,),
    gathered in arrays of this call's own first (see _group_sums)."""
    la, lb = np.zeros(c1 - c0), np.zeros(c1 - c0)
    for n in range(n0, n1):
        for c in range(c0, c1):
            base = (n * C + c) * HW
            a, b = _row_grad_sums(x[base : base + HW], dy[base : base + HW], centre[c])
            la[c - c0] += a
            lb[c - c0] += b
    for c in range(c0, c1):
        sa[c] += la[c - c0]
        sb[c] += lb[c - c0]


@njit(fastmath=_FAST, cache=True)
def _group_dx(x, dy, dx, C, HW, c0, c1, n0, n1, centre, k):
    for n in range(n0, n1):
        for c in range(c0, c1):
            base = (n * C + c) * HW
            xr, gr, out = x[base : base + HW], dy[base : base + HW], dx[base : base + HW]
            _dx_row(xr, gr, out, centre[c], k[0, c], k[1, c], k[2, c])


@njit(fastmath=_FAST, cache=True)
def _first_row_shifts(x, C, HW, shift):
    """shift[c] = the mean of channel c's first row, in x's type: a value of the size of the
    channel's mean, so the shifted sums do not cancel."""
    for c in range(C):
        s, _ = _row_sums(x[c * HW : (c + 1) * HW], x.dtype.type(0))
        shift[c] = s / HW


def _train_forward_nchw(
    x, N, C, HW, group, splits, w, b, momentum, eps, rmean, rvar, y, mean, invstd
):
    """Training forward of flat NCHW x into y; mean, invstd (C,) float64; running buffers
    updated when not empty. Groups of ``group`` channels: with ``splits`` == 1 each group is
    one task (reduced, then normalized from cache); with ``splits`` > 1 (fewer groups than
    threads) the groups go one after another, each split over the batch into ``splits``
    tasks that reduce, merge, then normalize the rows they reduced."""
    shift = np.empty(C, x.dtype)
    _first_row_shifts(x, C, HW, shift)
    centre, scale, beta = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    count = float(N * HW)
    n_groups = (C + group - 1) // group
    if splits == 1:
        s, q = np.zeros((1, C)), np.zeros((1, C))
        for g in prange(n_groups):
            c0, c1 = g * group, min(C, (g + 1) * group)
            _group_sums(x, C, HW, c0, c1, 0, N, shift, s[0], q[0])
            _train_constants(
                c0, c1, s, q, shift, count, w, b, momentum, eps,
                rmean, rvar, mean, invstd, centre, scale, beta,
            )  # fmt: skip
            _group_normalize(x, y, C, HW, c0, c1, 0, N, centre, scale, beta, False)
        return
    s, q = np.zeros((splits, C)), np.zeros((splits, C))
    for g in range(n_groups):
        c0, c1 = g * group, min(C, (g + 1) * group)
        for k in prange(splits):
            _group_sums(x, C, HW, c0, c1, k * N // splits, (k + 1) * N // splits, shift, s[k], q[k])
        _train_constants(
            c0, c1, s, q, shift, count, w, b, momentum, eps,
            rmean, rvar, mean, invstd, centre, scale, beta,
        )  # fmt: skip
        for k in prange(splits):
            n0, n1 = k * N // splits, (k + 1) * N // splits
            _group_normalize(x, y, C, HW, c0, c1, n0, n1, centre, scale, beta, False)


def _backward_nchw(x, dy, N, C, HW, group, splits, mean, invstd, w, batch_stats, dx, dgamma, dbeta):
    """dx of flat NCHW x, dy; dgamma = sum(dy * x_hat), dbeta = sum(dy) (C,, x's type).
    Groups as in _train_forward_nchw: each reduced, then its dx computed from cache."""
    centre = mean.astype(x.dtype)
    k = np.empty((3, C), x.dtype)
    count = float(N * HW)
    n_groups = (C + group - 1) // group
    if splits == 1:
        sa, sb = np.zeros((1, C)), np.zeros((1, C))
        for g in prange(n_groups):
            c0, c1 = g * group, min(C, (g + 1) * group)
            _group_grad_sums(x, dy, C, HW, c0, c1, 0, N, centre, sa[0], sb[0])
            _grad_constants(
                c0, c1, sa, sb, mean, invstd, w, count, batch_stats, centre, dgamma, dbeta, k
            )
            _group_dx(x, dy, dx, C, HW, c0, c1, 0, N, centre, k)
        return
    sa, sb = np.zeros((splits, C)), np.zeros((splits, C))
    for g in range(n_groups):
        c0, c1 = g * group, min(C, (g + 1) * group)
        for t in prange(splits):
            n0, n1 = t * N // splits, (t + 1) * N // splits
            _group_grad_sums(x, dy, C, HW, c0, c1, n0, n1, centre, sa[t], sb[t])
        _grad_constants(
            c0, c1, sa, sb, mean, invstd, w, count, batch_stats, centre, dgamma, dbeta, k
        )
        for t in prange(splits):
            n0, n1 = t * N // splits, (t + 1) * N // splits
            _group_dx(x, dy, dx, C, HW, c0, c1, n0, n1, centre, k)


# ---------------------------------------------------------------------------------
# Rows (M, C): blocks of rows, vectorized across C
# ---------------------------------------------------------------------------------


@njit(fastmath=_FAST, cache=True)
def _rows_sums(x, C, r0, r1, shift, s, q):
    """Add sum(d), sum(d^2) of d = x[r] - shift over rows r0..r1 of flat (M, C) x to s, q
    (C,) float64: ROWS_IN_TYPE rows at a time in x's type, vectorized across C, into float64
    arrays of this call's own, added to s, q at the end. (Each thread has its row of a
    shared (threads, C) array; adding into it every ROWS_IN_TYPE rows, two threads would
    pass the cache line their rows share back and forth: twice the time at (100352, 64).)"""
    sb, qb = np.empty(C, x.dtype), np.empty(C, x.dtype)
    s64, q64 = np.zeros(C), np.zeros(C)
    for b0 in range(r0, r1, ROWS_IN_TYPE):
        sb[:] = 0
        qb[:] = 0
        for r in range(b0, min(b0 + ROWS_IN_TYPE, r1)):
            xr = x[r * C : (r + 1) * C]
            for c in range(C):
                d = xr[c] - shift[c]
                sb[c] += d
                qb[c] += d * d
        for c in range(C):
            s64[c] += sb[c]
            q64[c] += qb[c]
    for c in range(C):
        s[c] += s64[c]
        q[c] += q64[c]


@njit(fastmath=_FAST, cache=True)
def _rows_normalize(x, y, C, r0, r1, centre, scale, beta, relu):
    zero = x.dtype.type(0)
    for r in range(r0, r1):
        xr, yr = x[r * C : (r + 1) * C], y[r * C : (r + 1) * C]
        if relu:
            for c in range(C):
                v = (xr[c] - centre[c]) * scale[c] + beta[c]
                yr[c] = zero if v < zero else v
        else:
            for c in range(C):
                yr[c] = (xr[c] - centre[c]) * scale[c] + beta[c]


@njit(fastmath=_FAST, cache=True)
def _rows_grad_sums(x, dy, C, r0, r1, centre, sa, sb):
    """Add sum(dy) and sum(dy * (x - centre)) over rows r0..r1 to sa, sb (C,) float64,
    through arrays of this call's own (see _rows_sums)."""
    ab, bb = np.empty(C, x.dtype), np.empty(C, x.dtype)
    a64, b64 = np.zeros(C), np.zeros(C)
    for b0 in range(r0, r1, ROWS_IN_TYPE):
        ab[:] = 0
        bb[:] = 0
        for r in range(b0, min(b0 + ROWS_IN_TYPE, r1)):
            xr, gr = x[r * C : (r + 1) * C], dy[r * C : (r + 1) * C]
            for c in range(C):
                g = gr[c]
                ab[c] += g
                bb[c] += g * (xr[c] - centre[c])
        for c in range(C):
            a64[c] += ab[c]
            b64[c] += bb[c]
    for c in range(C):
        sa[c] += a64[c]
        sb[c] += b64[c]


@njit(fastmath=_FAST, cache=True)
def _rows_dx(x, dy, dx, C, r0, r1, centre, k, batch_stats):
    kx, kg, k0 = k[0], k[1], k[2]
    if not batch_stats:  # dx = dy * weight * invstd, x unread (see _dx_row)
        for r in range(r0, r1):
            gr, out = dy[r * C : (r + 1) * C], dx[r * C : (r + 1) * C]
            for c in range(C):
                out[c] = gr[c] * kg[c]
        return
    for r in range(r0, r1):
        lo, hi = r * C, (r + 1) * C
        xr, gr, out = x[lo:hi], dy[lo:hi], dx[lo:hi]
        for c in range(C):
            out[c] = (xr[c] - centre[c]) * kx[c] + gr[c] * kg[c] + k0[c]


def _train_forward_rows(x, M, C, blocks, w, b, momentum, eps, rmean, rvar, y, mean, invstd):
    """Training forward of flat (M, C) x into y: ``blocks`` row blocks reduced in parallel
    (shifted by the first row), their partial sums added, then the blocks normalized."""
    shift = x[:C].copy()
    s, q = np.zeros((blocks, C)), np.zeros((blocks, C))
    for t in prange(blocks):
        _rows_sums(x, C, t * M // blocks, (t + 1) * M // blocks, shift, s[t], q[t])
    centre, scale, beta = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    _train_constants(
        0, C, s, q, shift, float(M), w, b, momentum, eps,
        rmean, rvar, mean, invstd, centre, scale, beta,
    )  # fmt: skip
    for t in prange(blocks):
        _rows_normalize(x, y, C, t * M // blocks, (t + 1) * M // blocks, centre, scale, beta, False)


def _backward_rows(x, dy, M, C, blocks, mean, invstd, w, batch_stats, dx, dgamma, dbeta):
    """dx, dgamma, dbeta of flat (M, C) x, dy: row blocks reduced in parallel, then dx."""
    centre = mean.astype(x.dtype)
    sa, sb = np.zeros((blocks, C)), np.zeros((blocks, C))
    for t in prange(blocks):
        _rows_grad_sums(x, dy, C, t * M // blocks, (t + 1) * M // blocks, centre, sa[t], sb[t])
    k = np.empty((3, C), x.dtype)
    _grad_constants(0, C, sa, sb, mean, invstd, w, float(M), batch_stats, centre, dgamma, dbeta, k)
    for t in prange(blocks):
        _rows_dx(x, dy, dx, C, t * M // blocks, (t + 1) * M // blocks, centre, k, batch_stats)


def _eval_forward(x, C, HW, blocks, rmean, rvar, w, b, eps, relu, y, mean, invstd):
    """y = (x - running_mean) * scale + beta (then ReLU), one pass; mean, invstd (C,)
    float64 from the running buffers. NCHW: the rows split over ``blocks`` tasks."""
    centre, scale, beta = np.empty(C, x.dtype), np.empty(C, x.dtype), np.empty(C, x.dtype)
    for c in range(C):
        mean[c] = rmean[c]
        invstd[c] = 1.0 / np.sqrt(float(rvar[c]) + eps)
        _affine_constants(c, mean[c], invstd[c], w, b, centre, scale, beta)
    rows = x.shape[0] // C if HW == 1 else x.shape[0] // HW  # rows of (M, C) or (N*C, HW)
    for t in prange(blocks):
        r0, r1 = t * rows // blocks, (t + 1) * rows // blocks
        if HW == 1:
            _rows_normalize(x, y, C, r0, r1, centre, scale, beta, relu)
        else:
            for r in range(r0, r1):
                c = r % C
                xr, yr = x[r * HW : (r + 1) * HW], y[r * HW : (r + 1) * HW]
                _normalize_row(xr, yr, centre[c], scale[c], beta[c], relu)


_TRAIN_NCHW = _compiled_twice(_train_forward_nchw)
_BACKWARD_NCHW = _compiled_twice(_backward_nchw)
_TRAIN_ROWS = _compiled_twice(_train_forward_rows)
_BACKWARD_ROWS = _compiled_twice(_backward_rows)
_EVAL = _compiled_twice(_eval_forward)


# ---------------------------------------------------------------------------------
# The plan: group size, splits, serial or parallel
# ---------------------------------------------------------------------------------


def channel_group(
    N: int, C: int, HW: int, itemsize: int, streams: int = 1, threads: int = 1,
    caches: CacheSizes | None = None,
) -> int:  # fmt: skip
    """Channels per group for NCHW input: the most whose slab fits L2_SHARE of one core's
    L2, at least 1, at most ceil(C / threads) (so every thread gets a group).

    A channel's slab is ``streams * N * HW * itemsize`` bytes (streams: 1 for the forward's
    x, 2 for the backward's x and dy), shared among ``threads`` when a group is split over
    the batch. When even one channel is larger than the L2 share, a group is one channel:
    its second pass is then served by the last-level cache if the slab fits a thread's
    share of it (see :func:`group_fits`), and by main memory otherwise.
    """
    caches = caches or cache_sizes()
    slab = streams * N * HW * itemsize
    fit = int(L2_SHARE * caches.l2) // max(slab, 1)
    return max(1, min(fit, -(-C // max(threads, 1))))


def group_fits(
    N: int, C: int, HW: int, itemsize: int, streams: int = 1, threads: int = 1,
    caches: CacheSizes | None = None,
) -> str:  # fmt: skip
    """Where a group's second pass is served from: "L2", "LLC" or "memory"."""
    caches = caches or cache_sizes()
    slab = streams * N * HW * itemsize * channel_group(N, C, HW, itemsize, streams, threads, caches)
    if slab <= L2_SHARE * caches.l2:
        return "L2"
    return "LLC" if slab <= L2_SHARE * caches.llc / max(threads, 1) else "memory"


@functools.lru_cache(maxsize=256)
def plan(N: int, C: int, HW: int, itemsize: int, streams: int, threads: int) -> tuple:
    """(parallel, group, splits) for one call: serial below SERIAL_BELOW_* values; a group
    size from :func:`channel_group`; splits > 1 only when there are fewer groups than
    threads (a group is then split over the batch)."""
    parallel = (
        N * C * HW >= (SERIAL_BELOW_ROWS if HW == 1 else SERIAL_BELOW_BLOCKED) and threads > 1
    )
    threads = threads if parallel else 1
    group = channel_group(N, C, HW, itemsize, streams, threads)
    n_groups = -(-C // group)
    splits = 1 if n_groups >= threads else min(threads, N)
    if splits > 1:  # each thread holds 1/splits of a group: larger groups fit
        group = channel_group(max(1, N // splits), C, HW, itemsize, streams, 1)
    return parallel, group, splits


# Tests and notebook 04 may force a plan: (parallel, group, splits), or None for the rule.
FORCE_PLAN: tuple | None = None


@numba.njit(parallel=dict(PRANGE_ONLY), cache=True)
def _touch_pool(out):
    for i in prange(out.shape[0]):
        out[i] = i


def threading_layer() -> str:
    """The Numba threading layer the parallel kernels run on ("omp", "tbb" or "workqueue").

    Numba loads its pool at the first parallel call; this makes one (a tiny one) if none
    ran yet, so the answer is the layer in use, not only the one asked for.
    """
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        _touch_pool(np.empty(2))
        return numba.threading_layer()


# ---------------------------------------------------------------------------------
# Public operations on torch tensors
# ---------------------------------------------------------------------------------

_DEVICE = ("cpu", "the CPU kernels need CPU tensors: call .cpu() first")
_NONE = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _np(t: Tensor | None, dtype) -> np.ndarray:
    """A (C,) tensor's memory as a NumPy array (no copy); an empty array for None."""
    return _NONE[dtype] if t is None else t.detach().numpy()


def _flat(t: Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a flat NumPy array (no copy)."""
    return t.detach().numpy().reshape(-1)


def _launch(N, C, HW, itemsize, streams):
    """(compiled variant: 0 parallel or 1 serial, group, splits, row blocks) for one call:
    the plan (or FORCE_PLAN), with the thread count read once."""
    threads = numba.get_num_threads()
    if FORCE_PLAN is not None:
        parallel, group, splits = FORCE_PLAN
    else:
        parallel, group, splits = plan(N, C, HW, itemsize, streams, threads)
    if not parallel:
        return 1, group, splits, 1
    rows = N if HW == 1 else N * C  # rows of (M, C), or of (N * C, HW) for the eval pass
    return 0, group, splits, min(threads, rows)


def _forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // (N * C)
    dt = x.dtype
    y, mean, invstd = torch.empty_like(x), np.empty(C), np.empty(C)
    w, b, rm, rv = _np(weight, dt), _np(bias, dt), _np(running_mean, dt), _np(running_var, dt)
    variant, group, splits, blocks = _launch(N, C, HW, x.element_size(), 1)
    if HW == 1:  # (M, C) rows: 2-D input or the channels_last view
        _TRAIN_ROWS[variant](
            _flat(x), N, C, blocks, w, b, momentum, eps, rm, rv, _flat(y), mean, invstd
        )
    else:
        _TRAIN_NCHW[variant](
            _flat(x), N, C, HW, group, splits, w, b, momentum, eps, rm, rv, _flat(y), mean, invstd
        )
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


def _backward(dy, x, mean, invstd, weight, batch_stats):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // (N * C)
    dt = x.dtype
    m, istd = mean.detach().double().numpy(), invstd.detach().double().numpy()  # no copy if float64
    dx = torch.empty_like(x)
    dgamma, dbeta = np.empty(C, _NONE[dt].dtype), np.empty(C, _NONE[dt].dtype)
    variant, group, splits, blocks = _launch(N, C, HW, x.element_size(), 2)
    xf, gf, w, dxf = _flat(x), _flat(dy), _np(weight, dt), _flat(dx)
    if HW == 1:
        _BACKWARD_ROWS[variant](xf, gf, N, C, blocks, m, istd, w, batch_stats, dxf, dgamma, dbeta)
    else:
        _BACKWARD_NCHW[variant](
            xf, gf, N, C, HW, group, splits, m, istd, w, batch_stats, dxf, dgamma, dbeta
        )
    return dx, torch.from_numpy(dgamma), torch.from_numpy(dbeta)


def _forward_eval(x, running_mean, running_var, weight, bias, eps, relu):
    N, C = x.shape[0], x.shape[1]
    HW = x.numel() // (N * C)
    dt = x.dtype
    y, mean, invstd = torch.empty_like(x), np.empty(C), np.empty(C)
    variant, _, _, blocks = _launch(N, C, HW, x.element_size(), 1)
    rm, rv = running_mean.detach().numpy(), running_var.detach().numpy()
    _EVAL[variant](
        _flat(x), C, HW, blocks, rm, rv, _np(weight, dt), _np(bias, dt), eps, relu,
        _flat(y), mean, invstd,
    )  # fmt: skip
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: ``(y, mean, invstd)``; x (N, C, *) contiguous (a channels_last
    tensor comes as its (rows, C) view), weight/bias (C,) or None, running buffers (C,) or
    None (updated in place with PyTorch's rule, in float64, unbiased variance); y like x,
    mean and invstd (C,) float64 (what the backward reads). One compiled call: NCHW reads
    x from memory once and writes y (2 passes); (M, C) reads x twice (3 passes)."""
    validate.validate_forward_args(
        x, eps, _DEVICE, True,
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    momentum = 0.0 if momentum is None else float(momentum)  # unused without running buffers
    return _forward_train(x, weight, bias, running_mean, running_var, momentum, float(eps))


def forward_eval(x, running_mean, running_var, weight, bias, eps, relu: bool = False):
    """Eval forward from the running statistics, ReLU optionally fused: one pass (read x,
    write y). Returns ``(y, mean, invstd)``, mean and invstd (C,) float64 (a snapshot of
    the running statistics, which the backward reads)."""
    validate.validate_forward_args(
        x, eps, _DEVICE, False,
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    return _forward_eval(x, running_mean, running_var, weight, bias, float(eps), bool(relu))


def backward_train(dy, x, mean, invstd, weight, batch_stats: bool = True):
    """``(dx, dgamma, dbeta)``: dx like x, dgamma = sum(dy * x_hat) and dbeta = sum(dy), (C,)
    in x's type; mean, invstd as forward_train/forward_eval returned them. One compiled
    call: NCHW reads x and dy once and writes dx (3 passes); (M, C) reads them twice (5).
    ``batch_stats`` False: the eval-mode gradient (statistics are constants), dx = dy *
    weight * invstd."""
    validate.validate_backward_args(dy, x, mean, invstd, weight, _DEVICE)
    return _backward(dy, x, mean, invstd, weight, bool(batch_stats))


# ---------------------------------------------------------------------------------
# The operations one at a time (notebook 04 and the tests call them): thin wrappers
# around the same compiled entries.
# ---------------------------------------------------------------------------------


def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of x (N, C, *): three (C,)
    in x's dtype (computed by the training forward's reduction, its output discarded)."""
    validate.validate_stats_args(x, eps, _DEVICE)
    _, mean, invstd = _forward_train(x, None, None, None, None, 0.0, float(eps))
    var = (1.0 / invstd**2 - eps).clamp_(min=0.0)
    return mean.to(x.dtype), var.to(x.dtype), invstd.to(x.dtype)


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel; x (N, C, *), the rest (C,)."""
    C, HW, weight, bias = validate.validate_normalize_args(x, mean, invstd, weight, bias, _DEVICE)
    # the eval kernel computes invstd as 1/sqrt(var + eps): hand it var = 1/invstd^2, eps = 0
    var = 1.0 / invstd.double() ** 2
    return _forward_eval(x, mean.double(), var, weight, bias, 0.0, False)[0]


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel sum(dy) and sum(dy * x_hat): two (C,) tensors (dbeta and dgamma)."""
    validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    _, dgamma, dbeta = _backward(dy, x, mean, invstd, None, False)
    return dbeta, dgamma


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
    Elementwise only (its sums are given), so it is computed with torch operations.
    """
    _, HW, weight = validate.validate_backward_elementwise_args(
        dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, _DEVICE
    )
    shape = (1, -1) + (1,) * (x.dim() - 2)
    istd = invstd.double()
    a = (sum_dy.double() / count).view(shape)
    b = (sum_dy_xhat.double() * istd / count).view(shape)
    x_c = x.double() - mean.double().view(shape)
    dx = (dy.double() - a - x_c * b) * (weight.double() * istd).view(shape)
    return dx.to(x.dtype)


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
