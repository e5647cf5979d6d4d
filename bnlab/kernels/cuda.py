"""Batch Normalization kernels written with ``numba.cuda``, launched on torch tensors.

Every array is seen *flat*: ``x`` of shape (N, C, *) is a contiguous 1-D array of
``N * C * HW`` values, where ``HW`` is the product of the trailing axes, so the value
``x[n, c, j]`` sits at ``(n * C + c) * HW + j``. A channel's ``m = N * HW`` values are
N runs of HW contiguous values.

Kernels (one CUDA block per channel for the reductions, a grid-stride loop for the
elementwise ones):

- ``channel_stats``: each thread folds its share of the channel with Welford's update,
  then the block merges the per-thread (count, mean, M2) triples pairwise in shared
  memory (Chan et al.'s formula) in a tree of log2(block) steps;
- ``channel_stats_partial`` + ``merge_partials``: the split variant, several blocks per
  channel, for few channels with a large N*HW (one block per channel would leave most
  of the GPU idle);
- ``normalize``: ``y = (x - mean) * invstd * gamma + beta``;
- ``backward_reduce``: per channel ``sum(dy)`` and ``sum(dy * x_hat)``;
- ``backward_elementwise``: the compact formula
  ``dx = gamma * invstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)``;
- ``update_running``: PyTorch's running statistics (unbiased variance, momentum on the
  new value), one thread per channel.

The kernels are built by :func:`sources` for one float type and block size, so a
float32 kernel never touches float64 (every constant is of the kernel's own type), and
:mod:`bnlab.kernels.ptx` can compile the same Python functions to PTX.

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
MAX_BLOCKS = 4 if SIMULATOR else 4096  # grid cap for the grid-stride elementwise kernels
# Split statistics (several blocks per channel, merged with Chan's formula) when there are
# few channels for many values: each block should keep at least VALUES_PER_THREAD values per
# thread to amortize its merge, at most MAX_SPLIT blocks serve one channel, and about
# TARGET_BLOCKS blocks in all are enough to fill a large GPU (an H100 SXM has 132 SMs).
VALUES_PER_THREAD = 8
MAX_SPLIT = 64
TARGET_BLOCKS = 1024

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _device_helpers(np_dtype: type, block: int) -> SimpleNamespace:
    """Device functions and typed constants shared by the kernels of one float type."""
    nbtype = types.float32 if np_dtype == np.float32 else types.float64
    zero, one = np_dtype(0), np_dtype(1)
    device = cuda.jit(device=True)

    chan_merge = device(merge_moments)  # Chan, Golub & LeVeque (1979), bnlab.nn.merge

    @device
    def thread_welford(x, c, C, HW, start, stop, step):
        # Welford (1962): one pass, no E[x^2] - E[x]^2 cancellation.
        n, mean, m2 = zero, zero, zero
        for i in range(start, stop, step):
            row = i // HW
            v = x[(row * C + c) * HW + (i - row * HW)]
            n += one
            delta = v - mean
            mean += delta / n
            m2 += delta * (v - mean)
        return n, mean, m2

    @device
    def block_merge(sh_n, sh_mean, sh_m2):
        # Tree in shared memory: at each step the lower half merges in the upper half.
        tid = cuda.threadIdx.x
        s = block // 2
        while s > 0:
            if tid < s:
                n, mean, m2 = chan_merge(
                    sh_n[tid],
                    sh_mean[tid],
                    sh_m2[tid],
                    sh_n[tid + s],
                    sh_mean[tid + s],
                    sh_m2[tid + s],
                )
                sh_n[tid] = n
                sh_mean[tid] = mean
                sh_m2[tid] = m2
            cuda.syncthreads()
            s //= 2

    @device
    def block_stats(n, mean, m2):
        # Each thread's (count, mean, M2) -> the block's, valid in thread 0.
        tid = cuda.threadIdx.x
        sh_n = cuda.shared.array(block, nbtype)
        sh_mean = cuda.shared.array(block, nbtype)
        sh_m2 = cuda.shared.array(block, nbtype)
        sh_n[tid] = n
        sh_mean[tid] = mean
        sh_m2[tid] = m2
        cuda.syncthreads()
        block_merge(sh_n, sh_mean, sh_m2)
        return sh_n[0], sh_mean[0], sh_m2[0]

    @device
    def write_stats(c, n, mu, m2, eps, mean, var, invstd):
        v = m2 / n  # biased: this is what normalizes
        mean[c] = mu
        var[c] = v
        invstd[c] = one / math.sqrt(v + eps)

    return SimpleNamespace(
        nbtype=nbtype, zero=zero, one=one, chan_merge=chan_merge,
        thread_welford=thread_welford, block_stats=block_stats, write_stats=write_stats,
    )  # fmt: skip


def _statistics_kernels(d: SimpleNamespace, block: int) -> dict:
    """Per-channel mean, variance and invstd: one block per channel, or split and merged."""
    zero, chan_merge, thread_welford = d.zero, d.chan_merge, d.thread_welford
    block_stats, write_stats = d.block_stats, d.write_stats

    def channel_stats(x, C, HW, eps, mean, var, invstd):
        """One block per channel: Welford per thread, Chan's merge across the block."""
        c = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        m = (x.shape[0] // (C * HW)) * HW
        n, mu, m2 = thread_welford(x, c, C, HW, tid, m, block)
        n, mu, m2 = block_stats(n, mu, m2)
        if tid == 0:
            write_stats(c, n, mu, m2, eps, mean, var, invstd)

    def channel_stats_partial(x, C, HW, pn, pmean, pm2):
        """Split variant, grid (C, S): block (c, s) summarizes every S-th tile of channel c."""
        c = cuda.blockIdx.x
        s = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        m = (x.shape[0] // (C * HW)) * HW
        start = s * block + tid
        n, mu, m2 = thread_welford(x, c, C, HW, start, m, cuda.gridDim.y * block)
        n, mu, m2 = block_stats(n, mu, m2)
        if tid == 0:
            pn[c, s] = n
            pmean[c, s] = mu
            pm2[c, s] = m2

    def merge_partials(pn, pmean, pm2, eps, mean, var, invstd):
        """One block per channel merges the S partial (count, mean, M2) of the split variant."""
        c = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n, mu, m2 = zero, zero, zero
        for s in range(tid, pn.shape[1], block):
            n, mu, m2 = chan_merge(n, mu, m2, pn[c, s], pmean[c, s], pm2[c, s])
        n, mu, m2 = block_stats(n, mu, m2)
        if tid == 0:
            write_stats(c, n, mu, m2, eps, mean, var, invstd)

    return {
        "channel_stats": channel_stats,
        "channel_stats_partial": channel_stats_partial,
        "merge_partials": merge_partials,
    }


def _backward_reduce_kernel(d: SimpleNamespace, block: int):
    """Per channel sum(dy) and sum(dy * x_hat), tree-summed in shared memory."""
    zero, nbtype = d.zero, d.nbtype

    def backward_reduce(x, dy, C, HW, mean, invstd, sum_dy, sum_dy_xhat):
        """One block per channel: sum(dy) and sum(dy * x_hat), tree-summed in shared memory."""
        c = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        m = (x.shape[0] // (C * HW)) * HW
        mu, istd = mean[c], invstd[c]
        a, b = zero, zero
        for i in range(tid, m, block):
            row = i // HW
            k = (row * C + c) * HW + (i - row * HW)
            g = dy[k]
            a += g
            b += g * (x[k] - mu) * istd
        sh_a = cuda.shared.array(block, nbtype)
        sh_b = cuda.shared.array(block, nbtype)
        sh_a[tid] = a
        sh_b[tid] = b
        cuda.syncthreads()
        s = block // 2
        while s > 0:
            if tid < s:
                sh_a[tid] += sh_a[tid + s]
                sh_b[tid] += sh_b[tid + s]
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            sum_dy[c] = sh_a[0]
            sum_dy_xhat[c] = sh_b[0]

    return backward_reduce


def _elementwise_kernels(d: SimpleNamespace) -> dict:
    """Grid-stride kernels: normalize, affine (+ReLU), dx, the running-statistics update."""
    zero, one = d.zero, d.one

    def normalize(x, C, HW, mean, invstd, weight, bias, y):
        """Grid-stride loop: y = (x - mean) * invstd * weight + bias."""
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // HW) % C
            y[i] = (x[i] - mean[c]) * (invstd[c] * weight[c]) + bias[c]

    def affine(x, C, HW, scale, shift, relu, y):
        """Grid-stride loop: y = x * scale + shift, and max(., 0) when ``relu`` (eval + ReLU)."""
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // HW) % C
            v = x[i] * scale[c] + shift[c]
            y[i] = zero if (relu and v < zero) else v  # NaN stays NaN, as torch.relu

    def backward_elementwise(x, dy, C, HW, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_m, dx):
        """Grid-stride loop: the compact formula for dx."""
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            c = (i // HW) % C
            istd = invstd[c]
            xhat = (x[i] - mean[c]) * istd
            dx[i] = weight[c] * istd * (dy[i] - sum_dy[c] * inv_m - xhat * sum_dy_xhat[c] * inv_m)

    def update_running(running_mean, running_var, mean, var, momentum, unbias):
        """One thread per channel, PyTorch's rule: new = (1 - momentum) * old + momentum * batch."""
        c = cuda.grid(1)
        if c < running_mean.shape[0]:
            keep = one - momentum
            running_mean[c] = keep * running_mean[c] + momentum * mean[c]
            running_var[c] = keep * running_var[c] + momentum * (var[c] * unbias)

    return {
        "normalize": normalize,
        "affine": affine,
        "backward_elementwise": backward_elementwise,
        "update_running": update_running,
    }


def sources(np_dtype: type = np.float32, block: int = BLOCK) -> dict:
    """The kernels as Python functions for one float type and block size (a power of 2).

    Device helpers are wrapped with ``cuda.jit(device=True)``; kernels come back as plain
    functions, ready for ``cuda.jit`` or ``cuda.compile_ptx``.
    """
    if block & (block - 1):
        raise ValueError(f"block must be a power of 2 for the tree reduction (got {block})")
    d = _device_helpers(np_dtype, block)
    elementwise = _elementwise_kernels(d)
    return {
        **_statistics_kernels(d, block),
        "normalize": elementwise["normalize"],
        "affine": elementwise["affine"],
        "backward_reduce": _backward_reduce_kernel(d, block),
        "backward_elementwise": elementwise["backward_elementwise"],
        "update_running": elementwise["update_running"],
    }


def signatures(np_dtype: type = np.float32) -> dict:
    """Each kernel's argument types, for ``cuda.compile_ptx`` (flat C-contiguous arrays)."""
    f = types.float32 if np_dtype == np.float32 else types.float64
    v, m, i = types.Array(f, 1, "C"), types.Array(f, 2, "C"), types.int64
    return {
        "channel_stats": (v, i, i, f, v, v, v),
        "channel_stats_partial": (v, i, i, m, m, m),
        "merge_partials": (m, m, m, f, v, v, v),
        "normalize": (v, i, i, v, v, v, v, v),
        "affine": (v, i, i, v, v, types.boolean, v),
        "backward_reduce": (v, v, i, i, v, v, v, v),
        "backward_elementwise": (v, v, i, i, v, v, v, v, v, f, v),
        "update_running": (v, v, v, v, f, f),
    }


@cache
def kernels(dtype: torch.dtype) -> SimpleNamespace:
    """The jitted kernels for a float dtype (compiled lazily on first launch, then cached)."""
    return SimpleNamespace(**{k: cuda.jit(f) for k, f in sources(_NUMPY[dtype]).items()})


# ---------------------------------------------------------------------------------
# Launch wrappers: torch tensors in, torch tensors out
# ---------------------------------------------------------------------------------


def _device_array(t: Tensor, flat: bool = True):
    """Zero-copy view: a device array on a GPU, the host buffer on the simulator."""
    t = t.detach().reshape(-1) if flat else t.detach()
    return cuda.as_cuda_array(t, sync=False) if not SIMULATOR else t.numpy()


def _launch(kernel, grid, block: int, *args) -> None:
    if SIMULATOR:
        kernel[grid, block](*args)
    else:  # torch's current stream, so the kernel is ordered with torch's own work
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        kernel[grid, block, stream](*args)


_DEVICE = (
    ("cpu", "the CUDA simulator works on host (CPU) tensors")
    if SIMULATOR
    else ("cuda", "the GPU kernels need CUDA tensors: call .cuda() first")
)


def _elementwise_grid(total: int) -> int:
    return max(1, min(MAX_BLOCKS, math.ceil(total / BLOCK)))


def channel_stats(x: Tensor, eps: float = 1e-5, split: int | None = None):
    """Per-channel mean, biased variance and 1/sqrt(var + eps) of x (N, C, *): three (C,).

    ``split``: number of blocks per channel; None picks 1 (one block per channel) unless
    there are few channels for many values, when the split variant fills the GPU.
    """
    N, C, HW = validate.validate_stats_args(x, eps, _DEVICE)
    k = kernels(x.dtype)
    mean, var, invstd = (torch.empty(C, dtype=x.dtype, device=x.device) for _ in range(3))
    m = N * HW
    if split is None:
        by_size = m // (VALUES_PER_THREAD * BLOCK)
        split = 1 if SIMULATOR else max(1, min(MAX_SPLIT, by_size, TARGET_BLOCKS // C))
    out = [_device_array(t) for t in (mean, var, invstd)]
    if split == 1:
        _launch(k.channel_stats, C, BLOCK, _device_array(x), C, HW, eps, *out)
    else:
        parts = [torch.empty(C, split, dtype=x.dtype, device=x.device) for _ in range(3)]
        p = [_device_array(t, flat=False) for t in parts]
        _launch(k.channel_stats_partial, (C, split), BLOCK, _device_array(x), C, HW, *p)
        _launch(k.merge_partials, C, BLOCK, *p, eps, *out)
    return mean, var, invstd


def normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None):
    """y = (x - mean) * invstd * weight + bias per channel; x (N, C, *), the rest (C,)."""
    C, HW, weight, bias = validate.validate_normalize_args(x, mean, invstd, weight, bias, _DEVICE)
    y = torch.empty_like(x)
    args = (_device_array(x), C, HW, *(_device_array(t) for t in (mean, invstd, weight, bias)))
    _launch(
        kernels(x.dtype).normalize, _elementwise_grid(x.numel()), BLOCK, *args, _device_array(y)
    )
    return y


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor):
    """Per-channel sum(dy) and sum(dy * x_hat): two (C,) tensors (dbeta and dgamma)."""
    _, C, HW = validate.validate_backward_reduce_args(dy, x, mean, invstd, _DEVICE)
    sum_dy, sum_dy_xhat = torch.empty_like(mean), torch.empty_like(mean)
    args = [_device_array(t) for t in (x, dy)] + [C, HW]
    args += [_device_array(t) for t in (mean, invstd, sum_dy, sum_dy_xhat)]
    _launch(kernels(x.dtype).backward_reduce, C, BLOCK, *args)
    return sum_dy, sum_dy_xhat


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
    args = [_device_array(t) for t in (x, dy)] + [C, HW]
    args += [_device_array(t) for t in (mean, invstd, weight, sum_dy, sum_dy_xhat)]
    inv_m = _NUMPY[x.dtype](1.0 / count)
    grid = _elementwise_grid(x.numel())
    _launch(kernels(x.dtype).backward_elementwise, grid, BLOCK, *args, inv_m, _device_array(dx))
    return dx


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """In place, with the signature and semantics of ``functional.update_running_stats``."""
    validate.validate_running(running_mean, running_var, mean, var)
    if not SIMULATOR:
        validate.validate_device(running_mean, "cuda", "keep the running buffers on the GPU")
    np_t = _NUMPY[mean.dtype]
    args = [_device_array(t) for t in (running_mean, running_var, mean, var)]
    grid = math.ceil(mean.numel() / BLOCK)
    _launch(
        kernels(mean.dtype).update_running,
        grid,
        BLOCK,
        *args,
        np_t(momentum),
        np_t(count / (count - 1)),
    )


# ---------------------------------------------------------------------------------
# The fused operations the autograd Function calls (the same names as bnlab.kernels.cpu)
# ---------------------------------------------------------------------------------


def forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: y and the (mean, invstd) the backward needs; running buffers (or
    None) updated in place. Three launches: statistics, running update, normalize."""
    mean, var, invstd = channel_stats(x, eps)
    if running_mean is not None:
        update_running_stats(
            running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
        )
    return normalize(x, mean, invstd, weight, bias), mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, relu: bool = False):
    """Eval forward from the running statistics, y = x * scale + shift, with ReLU fused in
    when ``relu``: one elementwise launch (the (C,) constants are torch operations)."""
    C, HW, weight, bias = validate.validate_normalize_args(
        x, running_mean, running_var, weight, bias, _DEVICE
    )
    invstd = torch.rsqrt(running_var + eps)
    scale = weight * invstd
    shift = bias - running_mean * scale
    y = torch.empty_like(x)
    args = (_device_array(x), C, HW, _device_array(scale), _device_array(shift), bool(relu))
    _launch(kernels(x.dtype).affine, _elementwise_grid(x.numel()), BLOCK, *args, _device_array(y))
    return y, running_mean.clone(), invstd


def backward_train(dy, x, mean, invstd, weight, batch_stats: bool = True):
    """dx, sum(dy * x_hat) (dgamma) and sum(dy) (dbeta); ``batch_stats`` False gives the
    eval-mode gradient dx = dy * weight * invstd. Two launches."""
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)
    a, b = (sum_dy, sum_dy_xhat) if batch_stats else (torch.zeros_like(mean),) * 2
    count = x.numel() // x.shape[1]
    return backward_elementwise(dy, x, mean, invstd, weight, a, b, count), sum_dy_xhat, sum_dy


def available() -> str:
    """Which target these kernels run on: "gpu" or "simulator"."""
    return "gpu" if (not SIMULATOR and gpu_available()) else "simulator"
