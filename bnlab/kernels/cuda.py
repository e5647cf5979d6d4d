"""Batch Normalization kernels written with ``numba.cuda``, launched on torch tensors.

Every tensor the kernels see is flat. Two layouts reach them (``bnlab.kernels.autograd``
hands a channels_last tensor over as its (rows, C) view):

- **planes**, x of shape (N, C, *) with HW > 1 values per plane: channel c is N runs
  ("rows") of HW contiguous values, row n at ``(n * C + c) * HW``;
- **rows**, x of shape (M, C) (a 2-D input, or channels_last with M = N * H * W): value
  ``x[r, c]`` at ``r * C + c``, so a channel's values are strided by C.

How the kernels are shaped for a GPU (the simulator runs the same code, tiny):

- **the channel comes from the grid**, never from an element index: grid (S, C) for
  planes (``blockIdx.y`` is the channel, ``blockIdx.x`` one of S blocks sharing it), grid
  (S, ceil(C / TX)) for rows. No per-element integer division or modulo;
- **planes**: a block of (TX, TY) threads, TX lanes along a row (coalesced), TY rows at a
  time; **rows**: TX lanes across channels (coalesced: a warp reads 32 neighbouring
  channels of one row, as torch's and Apex's channels-last kernels do), TY rows at a time;
- **four loads in flight per thread**: each thread starts 4 independent loads before it
  uses them (torch's PARALLEL_LOADS), then folds the 4 values into its running summary
  with one Chan merge (one division per 4 values, not per value);
- **warp shuffles** (``cuda.shfl_down_sync``) merge the threads of a warp; one barrier and
  a staging buffer in shared memory merge the warps (for rows: the TY rows of each
  channel, torch's ``welford_merge_block_vertical``). The simulator has no shuffles: there,
  and only there, ``shfl_down`` is emulated with shared memory and barriers, same tree;
- **split across blocks**: the statistics and the backward's two sums are computed by S
  blocks per channel into per-block partials, then merged by a second kernel (one warp per
  channel): no atomics, the result does not depend on timing;
- **fused launches**: the statistics kernel (or its merge) also updates the running
  statistics; training forward = 2 launches (3 when split), backward = 2 (3 when split);
- ``normalize`` computes ``(x - mean) * (invstd * gamma) + beta`` (exact for a constant
  channel, where ``x * scale + shift`` cancels), ReLU fused in for eval;
- ``backward_elementwise``: ``dx = gamma * invstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)``.

The kernels are built by :func:`sources` for one float type and block size, so a float32
kernel never touches float64 (every constant is of the kernel's own type), and compiled
with the explicit :func:`signatures` that :mod:`bnlab.kernels.ptx` also compiles: the PTX
check sees exactly the specialization that runs (eps and momentum passed as float32).

Serves notebook 04.
"""

from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import numpy as np
import torch
from numba import types
from torch import Tensor

from bnlab.kernels import validate
from bnlab.kernels.backend import cuda_module, gpu_available, is_simulator
from bnlab.nn.merge import merge_moments

cuda = cuda_module()
SIMULATOR = is_simulator()
# The simulator runs each thread as a Python thread: keep blocks and grids tiny there.
BLOCK = 32 if SIMULATOR else 256
WARP = 32
UNROLL = 4  # loads in flight per thread (torch's PARALLEL_LOADS)
# Split reductions (S blocks per channel, merged by a second kernel) when there are few
# channels for many values: about TARGET_BLOCKS blocks fill a large GPU (an H100 SXM has
# 132 SMs, 8 blocks of 256 threads each), each thread keeping at least VALUES_PER_THREAD
# values so that the merge stays cheap, and at most MAX_SPLIT blocks per channel.
TARGET_BLOCKS = 1024
VALUES_PER_THREAD = 16
MAX_SPLIT = 64
# Elementwise kernels: enough blocks for every SM, each thread looping over its share.
TARGET_ELEMENTWISE_BLOCKS = 4096
FULL_MASK = np.uint32(0xFFFFFFFF)

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _make_exchanges(d: SimpleNamespace):
    """(exchange2, exchange3): lane l receives the values of lane l + offset (its own past
    the warp's end), as ``cuda.shfl_down_sync``, for two or three values at once."""
    nbtype, block = d.nbtype, d.block
    device = cuda.jit(device=True)

    if SIMULATOR:
        # The simulator has no warp shuffles: the same exchange through shared memory, all
        # values at once, with one barrier (what costs the simulator's threads most). Two
        # buffers taken in turn (by the offset, which halves each round) keep the next
        # round's writes off a buffer that a slower thread may still be reading. Every
        # thread of the block calls it, as every lane of a warp calls a shuffle.

        @device
        def exchange2(a, b, offset):
            buf = cuda.shared.array((2, 2, block), nbtype)
            turn = int(offset).bit_length() % 2
            tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
            buf[turn, 0, tid], buf[turn, 1, tid] = a, b
            cuda.syncthreads()
            if (tid % WARP) + offset < WARP:  # else a shuffle returns the lane's own value
                a, b = buf[turn, 0, tid + offset], buf[turn, 1, tid + offset]
            return a, b

        @device
        def exchange3(a, b, c, offset):
            buf = cuda.shared.array((2, 3, block), nbtype)
            turn = int(offset).bit_length() % 2
            tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
            buf[turn, 0, tid], buf[turn, 1, tid], buf[turn, 2, tid] = a, b, c
            cuda.syncthreads()
            if (tid % WARP) + offset < WARP:
                k = tid + offset
                a, b, c = buf[turn, 0, k], buf[turn, 1, k], buf[turn, 2, k]
            return a, b, c
    else:

        @device
        def exchange2(a, b, offset):
            # lane l receives lane l + offset's values (its own past the warp's end)
            return cuda.shfl_down_sync(FULL_MASK, a, offset), cuda.shfl_down_sync(
                FULL_MASK, b, offset
            )

        @device
        def exchange3(a, b, c, offset):
            a2, b2 = exchange2(a, b, offset)
            return a2, b2, cuda.shfl_down_sync(FULL_MASK, c, offset)

    return exchange2, exchange3


def _make_rectify(d: SimpleNamespace):
    zero = d.zero

    @cuda.jit(device=True)
    def rectify(v, relu):
        # max(v, 0) when relu, keeping NaN (as torch.relu)
        return zero if (relu and v < zero) else v

    return rectify


def _make_merge4(d: SimpleNamespace):
    quarter, four, chan_merge = d.quarter, d.four, d.chan_merge
    device = cuda.jit(device=True)

    @device
    def merge4(n, mean, m2, v0, v1, v2, v3):
        # Four values summarized on their own (count 4, mean g, M2 q), then one Chan merge.
        g = ((v0 + v1) + (v2 + v3)) * quarter
        d0, d1, d2, d3 = v0 - g, v1 - g, v2 - g, v3 - g
        q = (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        return chan_merge(n, mean, m2, four, g, q)

    return merge4


def _make_thread_welford(d: SimpleNamespace):
    zero, one, merge4, chan_merge = d.zero, d.one, d.merge4, d.chan_merge
    device = cuda.jit(device=True)

    @device
    def thread_welford(x, N, CHW, HW, plane, row, row_step):
        """One thread's (count, mean, M2) over rows row, row + row_step, ... of one channel;
        in each row the columns tx, tx + TX, ..., four loads at a time (Welford, 1962, and
        Chan's merge: one pass, no E[x^2] - E[x]^2 cancellation)."""
        tx, width = cuda.threadIdx.x, cuda.blockDim.x
        n, mean, m2 = zero, zero, zero
        while row < N:
            base = row * CHW + plane
            j = base + tx
            end = base + HW
            while j + 3 * width < end:
                v0, v1, v2, v3 = x[j], x[j + width], x[j + 2 * width], x[j + 3 * width]
                n, mean, m2 = merge4(n, mean, m2, v0, v1, v2, v3)
                j += 4 * width
            while j < end:
                n, mean, m2 = chan_merge(n, mean, m2, one, x[j], zero)
                j += width
            row += row_step
        return n, mean, m2

    return thread_welford


def _make_column_welford(d: SimpleNamespace):
    zero, one, merge4, chan_merge = d.zero, d.one, d.merge4, d.chan_merge
    device = cuda.jit(device=True)

    @device
    def column_welford(x, M, C, c, row, row_step):
        """One thread's (count, mean, M2) of channel c over rows row, row + row_step, ...
        of an (M, C) array, four rows (loads) at a time."""
        n, mean, m2 = zero, zero, zero
        if c < C:
            k = row * C + c
            step, end = row_step * C, M * C
            while k + 3 * step < end:
                v0, v1, v2, v3 = x[k], x[k + step], x[k + 2 * step], x[k + 3 * step]
                n, mean, m2 = merge4(n, mean, m2, v0, v1, v2, v3)
                k += 4 * step
            while k < end:
                n, mean, m2 = chan_merge(n, mean, m2, one, x[k], zero)
                k += step
        return n, mean, m2

    return column_welford


def _make_warp_moments(d: SimpleNamespace):
    exchange3, chan_merge = d.exchange3, d.chan_merge
    device = cuda.jit(device=True)

    @device
    def warp_moments(n, mean, m2, width):
        # Lane l merges lane l + offset, offsets 16, 8, ..., width: afterwards lanes
        # 0..width-1 hold the warp's summary of their channel (width channels per warp).
        offset = WARP // 2
        while offset >= width:
            n2, mean2, m22 = exchange3(n, mean, m2, offset)
            n, mean, m2 = chan_merge(n, mean, m2, n2, mean2, m22)
            offset //= 2
        return n, mean, m2

    return warp_moments


def _make_block_moments(d: SimpleNamespace):
    nbtype, block, warps, warp_moments, chan_merge = (
        d.nbtype,
        d.block,
        d.warps,
        d.warp_moments,
        d.chan_merge,
    )
    device = cuda.jit(device=True)

    @device
    def block_moments(n, mean, m2, width):
        """The block's (count, mean, M2) per channel, valid in threads 0..width-1; ``width``
        channels lie side by side in each warp (1 for planes, TX for rows). Shuffles within
        each warp, one barrier, then the staging buffer's warps merged in order."""
        tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        lane, warp = tid % WARP, tid // WARP
        n, mean, m2 = warp_moments(n, mean, m2, width)
        sh_n = cuda.shared.array(block, nbtype)
        sh_mean = cuda.shared.array(block, nbtype)
        sh_m2 = cuda.shared.array(block, nbtype)
        if lane < width:
            sh_n[warp * width + lane] = n
            sh_mean[warp * width + lane] = mean
            sh_m2[warp * width + lane] = m2
        cuda.syncthreads()
        if tid < width:
            for w in range(1, warps):
                k = w * width + tid
                n, mean, m2 = chan_merge(n, mean, m2, sh_n[k], sh_mean[k], sh_m2[k])
        return n, mean, m2

    return block_moments


def _make_warp_sums(d: SimpleNamespace):
    exchange2 = d.exchange2
    device = cuda.jit(device=True)

    @device
    def warp_sums(a, b, width):
        offset = WARP // 2
        while offset >= width:
            a2, b2 = exchange2(a, b, offset)
            a, b = a + a2, b + b2
            offset //= 2
        return a, b

    return warp_sums


def _make_block_sums(d: SimpleNamespace):
    nbtype, block, warps, warp_sums = d.nbtype, d.block, d.warps, d.warp_sums
    device = cuda.jit(device=True)

    @device
    def block_sums(a, b, width):
        """Two sums per channel over the block, valid in threads 0..width-1 (as block_moments)."""
        tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        lane, warp = tid % WARP, tid // WARP
        a, b = warp_sums(a, b, width)
        sh_a = cuda.shared.array(block, nbtype)
        sh_b = cuda.shared.array(block, nbtype)
        if lane < width:
            sh_a[warp * width + lane] = a
            sh_b[warp * width + lane] = b
        cuda.syncthreads()
        if tid < width:
            for w in range(1, warps):
                a += sh_a[w * width + tid]
                b += sh_b[w * width + tid]
        return a, b

    return block_sums


def _make_finish_stats(d: SimpleNamespace):
    one = d.one
    device = cuda.jit(device=True)

    @device
    def finish_stats(c, n, mu, m2, eps, momentum, update, running_mean, running_var, work):
        # work rows 0, 1, 2: mean, biased variance (what normalizes), invstd; the running
        # statistics by PyTorch's rule, with the unbiased variance.
        var = m2 / n
        work[0, c] = mu
        work[1, c] = var
        work[2, c] = one / math.sqrt(var + eps)
        if update:
            keep = one - momentum
            running_mean[c] = keep * running_mean[c] + momentum * mu
            running_var[c] = keep * running_var[c] + momentum * (m2 / (n - one))

    return finish_stats


def _make_channel_stats(d: SimpleNamespace):
    thread_welford, block_moments, finish_stats = d.thread_welford, d.block_moments, d.finish_stats

    def channel_stats(x, N, C, HW, eps, momentum, update, running_mean, running_var, work):
        """Planes, grid (S, C): block (s, c) summarizes rows s*TY + ty, stepping S*TY, of
        channel c. S = 1 finishes here; otherwise it writes partial s to work rows
        3 + {0, S, 2S} + s for merge_stats."""
        c, s, S = cuda.blockIdx.y, cuda.blockIdx.x, cuda.gridDim.x
        ty, rows = cuda.threadIdx.y, cuda.blockDim.y
        n, mu, m2 = thread_welford(x, N, C * HW, HW, c * HW, s * rows + ty, S * rows)
        n, mu, m2 = block_moments(n, mu, m2, 1)
        if cuda.threadIdx.x == 0 and ty == 0:
            if S == 1:
                finish_stats(c, n, mu, m2, eps, momentum, update, running_mean, running_var, work)
            else:
                work[3 + s, c] = n
                work[3 + S + s, c] = mu
                work[3 + 2 * S + s, c] = m2

    return channel_stats


def _make_channel_stats_rows(d: SimpleNamespace):
    column_welford, block_moments, finish_stats = d.column_welford, d.block_moments, d.finish_stats

    def channel_stats_rows(x, M, C, eps, momentum, update, running_mean, running_var, work):
        """Rows, grid (S, ceil(C / TX)): lanes across channels, rows s*TY + ty stepping
        S*TY; the TY rows of each channel merged through the staging buffer."""
        s, S = cuda.blockIdx.x, cuda.gridDim.x
        tx, ty, rows = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.y
        c = cuda.blockIdx.y * cuda.blockDim.x + tx
        n, mu, m2 = column_welford(x, M, C, c, s * rows + ty, S * rows)
        n, mu, m2 = block_moments(n, mu, m2, cuda.blockDim.x)
        if ty == 0 and c < C:
            if S == 1:
                finish_stats(c, n, mu, m2, eps, momentum, update, running_mean, running_var, work)
            else:
                work[3 + s, c] = n
                work[3 + S + s, c] = mu
                work[3 + 2 * S + s, c] = m2

    return channel_stats_rows


def _make_merge_stats(d: SimpleNamespace):
    zero, warps, chan_merge, warp_moments, finish_stats = (
        d.zero,
        d.warps,
        d.chan_merge,
        d.warp_moments,
        d.finish_stats,
    )

    def merge_stats(work, S, eps, momentum, update, running_mean, running_var):
        """One warp per channel merges the S partials (Chan), then finishes the statistics."""
        C = work.shape[1]
        tid = cuda.threadIdx.x
        lane = tid % WARP
        c = cuda.blockIdx.x * warps + tid // WARP
        n, mu, m2 = zero, zero, zero
        if c < C:
            for s in range(lane, S, WARP):
                n, mu, m2 = chan_merge(n, mu, m2, work[3 + s, c], work[3 + S + s, c],
                                       work[3 + 2 * S + s, c])  # fmt: skip
        n, mu, m2 = warp_moments(n, mu, m2, 1)  # every lane takes part in the shuffles
        if lane == 0 and c < C:
            finish_stats(c, n, mu, m2, eps, momentum, update, running_mean, running_var, work)

    return merge_stats


def _make_backward_reduce(d: SimpleNamespace):
    zero, block_sums = d.zero, d.block_sums

    def backward_reduce(x, dy, N, C, HW, mean, invstd, work):
        """Planes, grid (S, C), as channel_stats: sum(dy) and sum(dy * (x - mean)), times
        invstd at the end. S = 1 writes work rows 0, 1; otherwise partial s to rows
        2 + {0, S} + s for merge_sums."""
        c, s, S = cuda.blockIdx.y, cuda.blockIdx.x, cuda.gridDim.x
        tx, width = cuda.threadIdx.x, cuda.blockDim.x
        rows = cuda.blockDim.y
        mu = mean[c]
        a0, a1, b0, b1 = zero, zero, zero, zero  # two accumulators each: shorter chains
        row = s * rows + cuda.threadIdx.y
        CHW = C * HW
        while row < N:
            base = row * CHW + c * HW
            j = base + tx
            end = base + HW
            while j + 3 * width < end:
                g0, g1, g2, g3 = dy[j], dy[j + width], dy[j + 2 * width], dy[j + 3 * width]
                v0, v1, v2, v3 = x[j], x[j + width], x[j + 2 * width], x[j + 3 * width]
                a0 += g0 + g2
                a1 += g1 + g3
                b0 += g0 * (v0 - mu) + g2 * (v2 - mu)
                b1 += g1 * (v1 - mu) + g3 * (v3 - mu)
                j += 4 * width
            while j < end:
                g = dy[j]
                a0 += g
                b0 += g * (x[j] - mu)
                j += width
            row += S * rows
        a, b = block_sums(a0 + a1, b0 + b1, 1)
        if tx == 0 and cuda.threadIdx.y == 0:
            if S == 1:
                work[0, c] = a
                work[1, c] = b * invstd[c]
            else:
                work[2 + s, c] = a
                work[2 + S + s, c] = b

    return backward_reduce


def _make_backward_reduce_rows(d: SimpleNamespace):
    zero, block_sums = d.zero, d.block_sums

    def backward_reduce_rows(x, dy, M, C, mean, invstd, work):
        """Rows, grid (S, ceil(C / TX)), as channel_stats_rows."""
        s, S = cuda.blockIdx.x, cuda.gridDim.x
        tx, ty, rows = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.y
        c = cuda.blockIdx.y * cuda.blockDim.x + tx
        a0, a1, b0, b1 = zero, zero, zero, zero
        if c < C:
            mu = mean[c]
            k = (s * rows + ty) * C + c
            step, end = S * rows * C, M * C
            while k + 3 * step < end:
                g0, g1, g2, g3 = dy[k], dy[k + step], dy[k + 2 * step], dy[k + 3 * step]
                v0, v1, v2, v3 = x[k], x[k + step], x[k + 2 * step], x[k + 3 * step]
                a0 += g0 + g2
                a1 += g1 + g3
                b0 += g0 * (v0 - mu) + g2 * (v2 - mu)
                b1 += g1 * (v1 - mu) + g3 * (v3 - mu)
                k += 4 * step
            while k < end:
                g = dy[k]
                a0 += g
                b0 += g * (x[k] - mu)
                k += step
        a, b = block_sums(a0 + a1, b0 + b1, cuda.blockDim.x)
        if ty == 0 and c < C:
            if S == 1:
                work[0, c] = a
                work[1, c] = b * invstd[c]
            else:
                work[2 + s, c] = a
                work[2 + S + s, c] = b

    return backward_reduce_rows


def _make_merge_sums(d: SimpleNamespace):
    zero, warps, warp_sums = d.zero, d.warps, d.warp_sums

    def merge_sums(work, S, invstd):
        """One warp per channel adds the S partial sums; sum(dy * x_hat) gets its invstd."""
        C = work.shape[1]
        tid = cuda.threadIdx.x
        lane = tid % WARP
        c = cuda.blockIdx.x * warps + tid // WARP
        a, b = zero, zero
        if c < C:
            for s in range(lane, S, WARP):
                a += work[2 + s, c]
                b += work[2 + S + s, c]
        a, b = warp_sums(a, b, 1)
        if lane == 0 and c < C:
            work[0, c] = a
            work[1, c] = b * invstd[c]

    return merge_sums


def _make_normalize(d: SimpleNamespace):
    rectify = d.rectify

    def normalize(x, N, C, HW, mean, invstd, weight, bias, relu, y):
        """Planes, grid (S, C): y = (x - mean) * (invstd * weight) + bias, ReLU when ``relu``."""
        c, S = cuda.blockIdx.y, cuda.gridDim.x
        tx, width, rows = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockDim.y
        mu, scale, beta = mean[c], invstd[c] * weight[c], bias[c]
        row = cuda.blockIdx.x * rows + cuda.threadIdx.y
        while row < N:
            base = (row * C + c) * HW
            j = base + tx
            end = base + HW
            while j + 3 * width < end:
                v0, v1, v2, v3 = x[j], x[j + width], x[j + 2 * width], x[j + 3 * width]
                o0, o1 = (v0 - mu) * scale + beta, (v1 - mu) * scale + beta
                o2, o3 = (v2 - mu) * scale + beta, (v3 - mu) * scale + beta
                y[j], y[j + width] = rectify(o0, relu), rectify(o1, relu)
                y[j + 2 * width], y[j + 3 * width] = rectify(o2, relu), rectify(o3, relu)
                j += 4 * width
            while j < end:
                o = (x[j] - mu) * scale + beta
                y[j] = rectify(o, relu)
                j += width
            row += S * rows

    return normalize


def _make_normalize_rows(d: SimpleNamespace):
    rectify = d.rectify

    def normalize_rows(x, M, C, mean, invstd, weight, bias, relu, y):
        """Rows, grid (S, ceil(C / TX)): lanes across channels, as normalize."""
        S = cuda.gridDim.x
        rows = cuda.blockDim.y
        c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            mu, scale, beta = mean[c], invstd[c] * weight[c], bias[c]
            k = (cuda.blockIdx.x * rows + cuda.threadIdx.y) * C + c
            step, end = S * rows * C, M * C
            while k + 3 * step < end:
                v0, v1, v2, v3 = x[k], x[k + step], x[k + 2 * step], x[k + 3 * step]
                o0, o1 = (v0 - mu) * scale + beta, (v1 - mu) * scale + beta
                o2, o3 = (v2 - mu) * scale + beta, (v3 - mu) * scale + beta
                y[k], y[k + step] = rectify(o0, relu), rectify(o1, relu)
                y[k + 2 * step], y[k + 3 * step] = rectify(o2, relu), rectify(o3, relu)
                k += 4 * step
            while k < end:
                o = (x[k] - mu) * scale + beta
                y[k] = rectify(o, relu)
                k += step

    return normalize_rows


def _make_backward_elementwise(d: SimpleNamespace):
    zero = d.zero

    def backward_elementwise(x, dy, N, C, HW, mean, invstd, weight, work, inv_m, correct, dx):
        """Planes, grid (S, C): dx = k * (dy - sum(dy)/m - x_hat * sum(dy x_hat)/m) with
        k = weight * invstd; ``correct`` False (eval-mode gradient) gives dx = k * dy."""
        c, S = cuda.blockIdx.y, cuda.gridDim.x
        tx, width, rows = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockDim.y
        istd = invstd[c]
        k = weight[c] * istd
        mu = mean[c]
        mean_dy, proj = zero, zero
        if correct:  # x_hat * sum(dy x_hat)/m = (x - mean) * proj
            mean_dy, proj = work[0, c] * inv_m, work[1, c] * inv_m * istd
        row = cuda.blockIdx.x * rows + cuda.threadIdx.y
        while row < N:
            base = (row * C + c) * HW
            j = base + tx
            end = base + HW
            while j + 3 * width < end:
                g0, g1, g2, g3 = dy[j], dy[j + width], dy[j + 2 * width], dy[j + 3 * width]
                v0, v1, v2, v3 = x[j], x[j + width], x[j + 2 * width], x[j + 3 * width]
                dx[j] = k * (g0 - mean_dy - (v0 - mu) * proj)
                dx[j + width] = k * (g1 - mean_dy - (v1 - mu) * proj)
                dx[j + 2 * width] = k * (g2 - mean_dy - (v2 - mu) * proj)
                dx[j + 3 * width] = k * (g3 - mean_dy - (v3 - mu) * proj)
                j += 4 * width
            while j < end:
                dx[j] = k * (dy[j] - mean_dy - (x[j] - mu) * proj)
                j += width
            row += S * rows

    return backward_elementwise


def _make_backward_elementwise_rows(d: SimpleNamespace):
    zero = d.zero

    def backward_elementwise_rows(x, dy, M, C, mean, invstd, weight, work, inv_m, correct, dx):
        """Rows, grid (S, ceil(C / TX)), as backward_elementwise."""
        S = cuda.gridDim.x
        rows = cuda.blockDim.y
        c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if c < C:
            istd = invstd[c]
            k = weight[c] * istd
            mu = mean[c]
            mean_dy, proj = zero, zero
            if correct:
                mean_dy, proj = work[0, c] * inv_m, work[1, c] * inv_m * istd
            i = (cuda.blockIdx.x * rows + cuda.threadIdx.y) * C + c
            step, end = S * rows * C, M * C
            while i + 3 * step < end:
                g0, g1, g2, g3 = dy[i], dy[i + step], dy[i + 2 * step], dy[i + 3 * step]
                v0, v1, v2, v3 = x[i], x[i + step], x[i + 2 * step], x[i + 3 * step]
                dx[i] = k * (g0 - mean_dy - (v0 - mu) * proj)
                dx[i + step] = k * (g1 - mean_dy - (v1 - mu) * proj)
                dx[i + 2 * step] = k * (g2 - mean_dy - (v2 - mu) * proj)
                dx[i + 3 * step] = k * (g3 - mean_dy - (v3 - mu) * proj)
                i += 4 * step
            while i < end:
                dx[i] = k * (dy[i] - mean_dy - (x[i] - mu) * proj)
                i += step

    return backward_elementwise_rows


def _device_helpers(np_dtype: type, block: int) -> SimpleNamespace:
    """Device functions and typed constants shared by the kernels of one float type: each
    built by its ``_make_*`` factory from the ones before it."""
    d = SimpleNamespace(
        nbtype=types.float32 if np_dtype == np.float32 else types.float64,
        block=block, warps=max(1, block // WARP),
        zero=np_dtype(0), one=np_dtype(1), four=np_dtype(4), quarter=np_dtype(0.25),
    )  # fmt: skip
    d.chan_merge = cuda.jit(device=True)(merge_moments)  # Chan et al. (1979), bnlab.nn.merge
    d.exchange2, d.exchange3 = _make_exchanges(d)
    d.rectify = _make_rectify(d)
    for name in _DEVICE_FUNCTIONS:
        setattr(d, name, globals()[f"_make_{name}"](d))
    return d


_DEVICE_FUNCTIONS = (
    "merge4", "thread_welford", "column_welford", "warp_moments", "block_moments",
    "warp_sums", "block_sums", "finish_stats",
)  # fmt: skip
KERNELS = (
    "channel_stats", "channel_stats_rows", "merge_stats",
    "backward_reduce", "backward_reduce_rows", "merge_sums",
    "normalize", "normalize_rows", "backward_elementwise", "backward_elementwise_rows",
)  # fmt: skip


def sources(np_dtype: type = np.float32, block: int = BLOCK) -> dict:
    """The kernels as Python functions for one float type and block size (a power of 2,
    a multiple of the warp on a GPU).

    Device helpers are wrapped with ``cuda.jit(device=True)``; kernels come back as plain
    functions, ready for ``cuda.jit(signature)`` or ``cuda.compile_ptx``.
    """
    if block & (block - 1) or block < WARP:
        raise ValueError(f"block must be a power of 2 and at least {WARP} (got {block})")
    d = _device_helpers(np_dtype, block)
    return {name: globals()[f"_make_{name}"](d) for name in KERNELS}


def signatures(np_dtype: type = np.float32) -> dict:
    """Each kernel's argument types: the one specialization compiled, launched and checked
    as PTX. Flat C-contiguous arrays; per-channel work arrays (rows, C); float scalars of
    the kernel's own type (a Python float would make eps float64)."""
    f = types.float32 if np_dtype == np.float32 else types.float64
    v, m, i, b = types.Array(f, 1, "C"), types.Array(f, 2, "C"), types.int64, types.boolean
    return {
        "channel_stats": (v, i, i, i, f, f, b, v, v, m),
        "channel_stats_rows": (v, i, i, f, f, b, v, v, m),
        "merge_stats": (m, i, f, f, b, v, v),
        "backward_reduce": (v, v, i, i, i, v, v, m),
        "backward_reduce_rows": (v, v, i, i, v, v, m),
        "merge_sums": (m, i, v),
        "normalize": (v, i, i, i, v, v, v, v, b, v),
        "normalize_rows": (v, i, i, v, v, v, v, b, v),
        "backward_elementwise": (v, v, i, i, i, v, v, v, m, f, b, v),
        "backward_elementwise_rows": (v, v, i, i, v, v, v, m, f, b, v),
    }


def kernels(dtype: torch.dtype) -> SimpleNamespace:
    """The kernels for a float dtype at the current BLOCK, each compiled for its one
    signature (then cached)."""
    return _compiled(dtype, BLOCK)


@cache
def _compiled(dtype: torch.dtype, block: int) -> SimpleNamespace:
    np_dtype = _NUMPY[dtype]
    sigs = signatures(np_dtype)
    return SimpleNamespace(**{k: cuda.jit(sigs[k])(f) for k, f in sources(np_dtype, block).items()})


# ---------------------------------------------------------------------------------
# Launch geometry: pure functions of the shape (tested without a GPU)
# ---------------------------------------------------------------------------------


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plane_block(HW: int, block: int | None = None) -> tuple[int, int]:
    """(TX, TY) for planes: TX lanes along a row, the largest power of 2 with TX * UNROLL
    <= HW (so a row is read 4 loads at a time), TY = block / TX rows at a time."""
    block = block or BLOCK
    tx = min(block, _pow2_at_most(max(1, HW // UNROLL)))
    return tx, block // tx


def rows_block(C: int, block: int | None = None) -> tuple[int, int]:
    """(TX, TY) for rows: TX lanes across channels (a warp's 32 neighbouring channels of one
    row are one 128-byte line), fewer for C < 32; TY = block / TX rows at a time."""
    tx = min(WARP, 1 << max(0, (C - 1).bit_length()))
    return tx, (block or BLOCK) // tx


def reduction_split(rows: int, values_per_row: int, channel_blocks: int, ty: int) -> int:
    """S, the blocks sharing one channel (or channel tile) in a reduction: about
    TARGET_BLOCKS blocks in all, each thread with >= VALUES_PER_THREAD values, <= MAX_SPLIT.
    Always 1 on the simulator (tests force a split explicitly)."""
    if SIMULATOR:
        return 1
    by_work = (rows * values_per_row) // (VALUES_PER_THREAD * BLOCK)
    by_rows = math.ceil(rows / ty)
    return max(1, min(MAX_SPLIT, TARGET_BLOCKS // channel_blocks, by_work, by_rows))


def elementwise_split(rows: int, channel_blocks: int, ty: int) -> int:
    """S for the elementwise kernels: about TARGET_ELEMENTWISE_BLOCKS blocks in all."""
    if SIMULATOR:
        return 1
    return max(1, min(math.ceil(rows / ty), math.ceil(TARGET_ELEMENTWISE_BLOCKS / channel_blocks)))


class _Geometry(SimpleNamespace):
    """Layout of one (N, C, HW) problem: planes or rows, the block shape, channel blocks."""


def _geometry(N: int, C: int, HW: int) -> _Geometry:
    if HW == 1:  # (M, C): 2-D input, or the rows view of a channels_last tensor
        tx, ty = rows_block(C)
        return _Geometry(rows_layout=True, rows=N, per_row=1, tx=tx, ty=ty,
                         channel_blocks=math.ceil(C / tx))  # fmt: skip
    tx, ty = plane_block(HW)
    return _Geometry(rows_layout=False, rows=N, per_row=HW, tx=tx, ty=ty, channel_blocks=C)


# ---------------------------------------------------------------------------------
# Launch wrappers: torch tensors in, torch tensors out
# ---------------------------------------------------------------------------------

# Device arrays of long-lived small tensors (weights, biases, running buffers), by address
# and shape: their conversion is a large share of a small call. The cache keeps each
# tensor alive, so an address cannot be reused by another tensor while it is cached.
_ARRAY_CACHE: dict[tuple, tuple[Tensor, object]] = {}
_ARRAY_CACHE_SIZE = 64
_STREAMS: dict[int, object] = {}
CONVERSIONS = {"count": 0}  # as_cuda_array calls made (the tests count them per fwd+bwd)


def _device_array(t: Tensor, cached: bool = False):
    """Zero-copy view: a device array on a GPU, the host buffer on the simulator."""
    t = t.detach()
    if SIMULATOR:
        CONVERSIONS["count"] += 1
        return t.numpy()
    key = (t.data_ptr(), tuple(t.shape), t.dtype) if cached else None
    if key is not None and key in _ARRAY_CACHE:
        return _ARRAY_CACHE[key][1]
    CONVERSIONS["count"] += 1
    array = cuda.as_cuda_array(t, sync=False)
    if key is not None:
        if len(_ARRAY_CACHE) >= _ARRAY_CACHE_SIZE:
            _ARRAY_CACHE.pop(next(iter(_ARRAY_CACHE)))
        _ARRAY_CACHE[key] = (t, array)
    return array


def _stream():
    """torch's current stream as a Numba stream, made once per stream (kernels are then
    ordered with torch's own work)."""
    handle = torch.cuda.current_stream().cuda_stream
    stream = _STREAMS.get(handle)
    if stream is None:
        stream = _STREAMS[handle] = cuda.external_stream(handle)
    return stream


def _launch(kernel, grid, block, *args) -> None:
    if SIMULATOR:
        kernel[grid, block](*args)
    else:
        kernel[grid, block, _stream()](*args)


_DEVICE = (
    ("cpu", "the CUDA simulator works on host (CPU) tensors")
    if SIMULATOR
    else ("cuda", "the GPU kernels need CUDA tensors: call .cuda() first")
)


@cache
def _identity_affine(C: int, dtype: torch.dtype, device: str) -> tuple[Tensor, Tensor]:
    # weight=None / bias=None: ones and zeros, made once per (C, dtype, device), never exposed
    return torch.ones(C, dtype=dtype, device=device), torch.zeros(C, dtype=dtype, device=device)


@cache
def _unused(dtype: torch.dtype, device: str) -> Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    ones, zeros = _identity_affine(x.shape[1], x.dtype, str(x.device))
    return (ones if weight is None else weight), (zeros if bias is None else bias)


def _stats_launch(x, N, C, HW, eps, momentum, running_mean, running_var, split=None):
    """Launch the statistics (and the running update): the (3 + 3S, C) work tensor, rows
    mean, biased variance, invstd, then the S partials; its device array and x's."""
    g = _geometry(N, C, HW)
    S = split or reduction_split(g.rows, g.per_row, g.channel_blocks, g.ty)
    k = kernels(x.dtype)
    np_t = _NUMPY[x.dtype]
    work = torch.empty(3 + (3 * S if S > 1 else 0), C, dtype=x.dtype, device=x.device)
    w = _device_array(work)
    update = running_mean is not None
    if update:
        run = (_device_array(running_mean, cached=True), _device_array(running_var, cached=True))
    else:  # stand-ins the kernel does not touch (never views of work: the simulator copies
        # each array argument in and back out, so aliased arguments would undo its writes)
        run = (_device_array(_unused(x.dtype, str(x.device)), cached=True),) * 2
    scalars = (np_t(eps), np_t(momentum if momentum is not None else 0.0), update)
    grid, block = (S, g.channel_blocks), (g.tx, g.ty)
    xs = _device_array(x.reshape(-1))
    if g.rows_layout:
        _launch(k.channel_stats_rows, grid, block, xs, N, C, *scalars, *run, w)
    else:
        _launch(k.channel_stats, grid, block, xs, N, C, HW, *scalars, *run, w)
    if S > 1:
        _launch(k.merge_stats, math.ceil(C / (BLOCK // WARP)), BLOCK, w, S, *scalars, *run)
    return work, w, xs


def _normalize_launch(x, N, C, HW, mean, invstd, weight, bias, relu, arrays=(None,) * 3):
    """y; ``arrays``: device arrays of (x, mean, invstd) already made, or None each."""
    d_x, d_mean, d_invstd = arrays
    g = _geometry(N, C, HW)
    S = elementwise_split(g.rows, g.channel_blocks, g.ty)
    y = torch.empty_like(x)
    d_mean = _device_array(mean) if d_mean is None else d_mean
    d_invstd = _device_array(invstd) if d_invstd is None else d_invstd
    consts = (d_mean, d_invstd, _device_array(weight, cached=True),
              _device_array(bias, cached=True), bool(relu))  # fmt: skip
    grid, block = (S, g.channel_blocks), (g.tx, g.ty)
    xs = _device_array(x.reshape(-1)) if d_x is None else d_x
    ys = _device_array(y.reshape(-1))
    if g.rows_layout:
        _launch(kernels(x.dtype).normalize_rows, grid, block, xs, N, C, *consts, ys)
    else:
        _launch(kernels(x.dtype).normalize, grid, block, xs, N, C, HW, *consts, ys)
    return y


def _backward_reduce_launch(x, dy, N, C, HW, mean, invstd, split=None):
    """Launch the two sums: the (2 + 2S, C) work tensor, rows sum(dy), sum(dy * x_hat),
    then the S partials; and the device arrays of x, dy, mean, invstd and work."""
    g = _geometry(N, C, HW)
    S = split or reduction_split(g.rows, g.per_row, g.channel_blocks, g.ty)
    k = kernels(x.dtype)
    work = torch.empty(2 + (2 * S if S > 1 else 0), C, dtype=x.dtype, device=x.device)
    arrays = SimpleNamespace(
        x=_device_array(x.reshape(-1)), dy=_device_array(dy.reshape(-1)),
        mean=_device_array(mean), invstd=_device_array(invstd), work=_device_array(work),
    )  # fmt: skip
    a = arrays
    grid, block = (S, g.channel_blocks), (g.tx, g.ty)
    if g.rows_layout:
        _launch(k.backward_reduce_rows, grid, block, a.x, a.dy, N, C, a.mean, a.invstd, a.work)
    else:
        _launch(k.backward_reduce, grid, block, a.x, a.dy, N, C, HW, a.mean, a.invstd, a.work)
    if S > 1:
        _launch(k.merge_sums, math.ceil(C / (BLOCK // WARP)), BLOCK, a.work, S, a.invstd)
    return work, arrays


def _backward_elementwise_launch(x, N, C, HW, weight, count, correct, arrays):
    g = _geometry(N, C, HW)
    S = elementwise_split(g.rows, g.channel_blocks, g.ty)
    dx = torch.empty_like(x)
    a = arrays
    args = (a.mean, a.invstd, _device_array(weight, cached=True), a.work,
            _NUMPY[x.dtype](1.0 / count), bool(correct), _device_array(dx.reshape(-1)))  # fmt: skip
    grid, block = (S, g.channel_blocks), (g.tx, g.ty)
    k = kernels(x.dtype)
    if g.rows_layout:
        _launch(k.backward_elementwise_rows, grid, block, a.x, a.dy, N, C, *args)
    else:
        _launch(k.backward_elementwise, grid, block, a.x, a.dy, N, C, HW, *args)
    return dx


# ---------------------------------------------------------------------------------
# The single operations (each validates its arguments)
# ---------------------------------------------------------------------------------


def channel_stats(x: Tensor, eps: float = 1e-5, split: int | None = None):
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of x (N, C, *): three (C,).

    ``split``: blocks per channel (or channel tile); None picks 1 unless there are few
    channels for many values, when S blocks per channel and a merge fill the GPU.
    """
    N, C, HW = validate.validate_stats_args(x, eps, _DEVICE)
    work, _, _ = _stats_launch(x, N, C, HW, eps, None, None, None, split)
    return work[0], work[1], work[2]


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None):
    """y = (x - mean) * invstd * weight + bias per channel; x (N, C, *), the rest (C,)."""
    C, HW, weight, bias = validate.validate_normalize_args(x, mean, invstd, weight, bias, _DEVICE)
    return _normalize_launch(x, x.shape[0], C, HW, mean, invstd, weight, bias, False)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, split: int | None = None):
    """Per-channel sum(dy) and sum(dy * x_hat): two (C,) tensors (dbeta and dgamma).

    ``split`` as in :func:`channel_stats`: S blocks per channel, merged by a second kernel.
    """
    N, C, HW = validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    work, _ = _backward_reduce_launch(x, dy, N, C, HW, mean, invstd, split)
    return work[0], work[1]


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
    work = torch.stack((sum_dy, sum_dy_xhat))
    arrays = SimpleNamespace(
        x=_device_array(x.reshape(-1)), dy=_device_array(dy.reshape(-1)),
        mean=_device_array(mean), invstd=_device_array(invstd), work=_device_array(work),
    )  # fmt: skip
    return _backward_elementwise_launch(x, x.shape[0], C, HW, weight, count, True, arrays)


# ---------------------------------------------------------------------------------
# The fused operations the autograd Function calls (the same names as bnlab.kernels.cpu):
# arguments validated once here, then only launches
# ---------------------------------------------------------------------------------


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: y and the (mean, invstd) the backward needs; running buffers (or
    None) updated in place by the statistics kernel. Two launches (three when split)."""
    N, C, HW = validate.validate_forward_args(
        x, eps, _DEVICE, training=True, weight=weight, bias=bias,
        running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    weight, bias = _affine(x, weight, bias)
    work, w, xs = _stats_launch(x, N, C, HW, eps, momentum, running_mean, running_var)
    mean, invstd = work[0], work[2]
    y = _normalize_launch(x, N, C, HW, mean, invstd, weight, bias, False, (xs, w[0], w[2]))
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, relu: bool = False):
    """Eval forward from the running statistics, y = (x - mean) * (invstd * weight) + bias,
    with ReLU fused in when ``relu``: one launch (invstd is a torch operation on (C,))."""
    N, C, HW = validate.validate_forward_args(
        x, eps, _DEVICE, training=False, weight=weight, bias=bias,
        running_mean=running_mean, running_var=running_var,
    )  # fmt: skip
    weight, bias = _affine(x, weight, bias)
    mean = running_mean.clone()  # saved for the backward: the buffer may change later
    invstd = torch.rsqrt(running_var + eps)
    y = _normalize_launch(x, N, C, HW, mean, invstd, weight, bias, relu)
    return y, mean, invstd


def backward_train(dy, x, mean, invstd, weight, batch_stats: bool = True):
    """dx, sum(dy * x_hat) (dgamma) and sum(dy) (dbeta); ``batch_stats`` False gives the
    eval-mode gradient dx = dy * weight * invstd. Two launches (three when split)."""
    N, C, HW = validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    weight, _ = _affine(x, weight, None)
    work, arrays = _backward_reduce_launch(x, dy, N, C, HW, mean, invstd)
    dx = _backward_elementwise_launch(x, N, C, HW, weight, N * HW, batch_stats, arrays)
    return dx, work[1], work[0]


def available() -> str:
    """Which target these kernels run on: "gpu" or "simulator"."""
    return "gpu" if (not SIMULATOR and gpu_available()) else "simulator"
