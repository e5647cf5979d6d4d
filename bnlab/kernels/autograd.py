"""The kernels behind autograd: a Function, a functional drop-in and BatchNorm modules.

``backend`` names the kernel set: "cpu" (:mod:`bnlab.kernels.cpu`) or "cuda"
(:mod:`bnlab.kernels.cuda`: a GPU, or the simulator without one). Both modules offer
the same five operations, so this file is written once for both.

Serves notebook 04.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from bnlab.nn import functional as F
from bnlab.nn import modules

BACKENDS = ("cpu", "cuda")


def ops(backend: str):
    """The kernel module for ``backend`` ("cpu" or "cuda"); importing "cuda" picks GPU/simulator."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    return importlib.import_module(f"bnlab.kernels.{backend}")


NO_HIGHER_ORDER = (
    "the Numba kernels' backward is not differentiable, so higher-order gradients "
    "(create_graph=True: gradient penalties, Hessian-vector products) are not available "
    "through bnlab.kernels; first-order gradients work. Use bnlab.modules.BatchNorm1d/2d "
    "(or bnlab.functional.batch_norm), whose backward is differentiable"
)
NO_FORWARD_AD = (
    "the Numba kernels have no forward-mode derivative (torch.func.jvp, forward_ad); use "
    "bnlab.modules.BatchNorm1d/2d (or bnlab.functional.batch_norm), which have one"
)


class KernelBatchNormFunction(torch.autograd.Function):
    """Forward and backward through the kernels; statistics computed in the forward.

    ``training=True``: batch statistics (and, when running buffers are given, their
    update); backward by the compact formula. ``training=False``: running statistics,
    and dx = dy * weight * invstd (the elementwise kernel with zero sums).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, backend):
        k = ops(backend)
        count = x.numel() // x.shape[1]
        if training:
            mean, var, invstd = k.channel_stats(x, eps)
            if running_mean is not None and running_var is not None:
                k.update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps)  # (C,): no kernel needed
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training, ctx.backend, ctx.count = training, backend, count
        return k.normalize(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: someone will differentiate dx again
            raise RuntimeError(NO_HIGHER_ORDER)
        x, weight, mean, invstd = ctx.saved_tensors
        k = ops(ctx.backend)
        dy = dy.contiguous()
        if ctx.training or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            sum_dy, sum_dy_xhat = k.backward_reduce(dy, x, mean, invstd)
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                a, b = sum_dy, sum_dy_xhat
            else:
                a = b = torch.zeros_like(mean)
            dx = k.backward_elementwise(dy, x, mean, invstd, weight, a, b, ctx.count)
        dgamma = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        dbeta = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dgamma, dbeta, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(NO_FORWARD_AD)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "cpu",
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` computed by the kernels.

    Inputs: x (N, C, *) contiguous float32/float64; running_mean, running_var (C,) or
    None; weight, bias (C,) or None. Returns a tensor of x's shape.
    """
    F.validate_batch_norm_args(x, running_mean, running_var, weight, training, eps, bias)
    return _batch_norm_validated(
        x, running_mean, running_var, weight, bias, training, momentum, eps, backend
    )


def _batch_norm_validated(
    x, running_mean, running_var, weight, bias, training, momentum, eps, backend
) -> Tensor:
    """:func:`batch_norm` after ``validate_batch_norm_args`` (the modules validate first)."""
    if x.numel() == 0:  # an empty batch: nothing for a kernel to do, and no statistics to update
        return F.batch_norm_validated(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
    try:
        return KernelBatchNormFunction.apply(
            x, weight, bias, running_mean, running_var, training, momentum, eps, backend
        )
    except RuntimeError as err:  # torch.func transforms refuse the Function before it runs
        if "setup_context" in str(err):
            raise RuntimeError(NO_FORWARD_AD) from err
        raise


class _KernelMixin:
    """Route a bnlab BatchNorm module's functional call through the kernels.

    The train/eval logic stays in bnlab.nn.modules._BatchNorm.forward; only its
    ``_normalize`` hook is replaced; ``backend`` is a keyword of the constructor.
    """

    def __init__(self, *args, backend: str = "cpu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ops(backend)  # an unknown backend fails here, not at the first forward
        self.backend = backend

    def _normalize(self, x, running_mean, running_var, training: bool, momentum: float) -> Tensor:
        # The kernels index NCHW memory. channels_last input is computed on an NCHW copy
        # and handed back channels_last, as torch's BatchNorm2d keeps the input's format.
        channels_last = x.dim() == 4 and not x.is_contiguous()
        channels_last = channels_last and x.is_contiguous(memory_format=torch.channels_last)
        out = _batch_norm_validated(
            x.contiguous(),
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.backend,
        )
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class BatchNorm1d(_KernelMixin, modules.BatchNorm1d):
    """bnlab.nn.modules.BatchNorm1d computed by the kernels; ``backend`` as a keyword."""


class BatchNorm2d(_KernelMixin, modules.BatchNorm2d):
    """bnlab.nn.modules.BatchNorm2d computed by the kernels; ``backend`` as a keyword."""
