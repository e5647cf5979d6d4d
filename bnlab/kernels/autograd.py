"""The kernels behind autograd: a Function, a functional drop-in and BatchNorm modules.

``backend`` names the kernel set: "cpu" (:mod:`bnlab.kernels.cpu`) or "cuda"
(:mod:`bnlab.kernels.cuda`: a GPU, or the simulator without one). Both modules offer
the same five operations, so this file is written once for both.

Serves notebook 04.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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
    and dx = dy * weight * invstd. Each pass is one fused call of the backend
    (``forward_train``, ``forward_eval``, ``backward_train``). ``x`` arrives contiguous
    in the kernels' layout: (N, C, *), or the (rows, C) view of a channels_last tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, backend):
        k = ops(backend)
        if training:
            y, mean, invstd = k.forward_train(
                x, weight, bias, running_mean, running_var, momentum, eps
            )
        else:
            y, mean, invstd = k.forward_eval(x, running_mean, running_var, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training, ctx.backend = training, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: someone will differentiate dx again
            raise RuntimeError(NO_HIGHER_ORDER)
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dgamma, dbeta = ops(ctx.backend).backward_train(
            dy.contiguous(), x, mean, invstd, weight, batch_stats=ctx.training
        )
        dx = dx if ctx.needs_input_grad[0] else None
        dgamma = dgamma if weight is not None and ctx.needs_input_grad[1] else None
        dbeta = dbeta if ctx.needs_input_grad[2] else None
        return dx, dgamma, dbeta, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(NO_FORWARD_AD)


def kernel_layout(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x in a layout the kernels index, and the map that gives a result x's own layout.

    A contiguous x is used as it is. A channels_last (or channels_last_3d) x is, in
    memory, a contiguous (N * H * W, C) array: it is handed to the kernels as that 2-D
    view (no copy), and results are viewed back, so they come out channels_last as
    torch's do. Any other strided x is copied once to contiguous.
    """
    if x.is_contiguous() or x.dim() < 3:
        return x.contiguous(), lambda t: t
    order = (0, *range(2, x.dim()), 1)  # channels last: N, spatial..., C
    moved = x.permute(order)
    if not moved.is_contiguous():
        return x.contiguous(), lambda t: t
    back = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return moved.reshape(-1, x.shape[1]), lambda t: t.view(moved.shape).permute(back)


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
    rows, restore = kernel_layout(x)
    try:
        return restore(
            KernelBatchNormFunction.apply(
                rows, weight, bias, running_mean, running_var, training, momentum, eps, backend
            )
        )
    except RuntimeError as err:  # torch.func transforms refuse the Function before it runs
        if "setup_context" in str(err):
            raise RuntimeError(NO_FORWARD_AD) from err
        raise


NEEDS_NO_GRAD = (
    "batch_norm_relu is an inference kernel without a backward; call it under "
    "torch.no_grad() or torch.inference_mode(), or use batch_norm followed by torch.relu "
    "when gradients are needed"
)


def batch_norm_relu(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "cpu",
) -> Tensor:
    """Eval-mode BatchNorm followed by ReLU in one pass over the data (read x, write y).

    Equals ``torch.relu(torch.nn.functional.batch_norm(x, running_mean, running_var,
    weight, bias, training=False, eps=eps))``, which reads and writes the tensor twice.
    Inference only: refused while autograd would need a gradient.
    """
    F.validate_batch_norm_args(x, running_mean, running_var, weight, False, eps, bias)
    needs_grad = (t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_grad_enabled() and any(needs_grad):
        raise RuntimeError(NEEDS_NO_GRAD)
    if x.numel() == 0:
        return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps))
    rows, restore = kernel_layout(x)
    y, _, _ = ops(backend).forward_eval(
        rows, running_mean, running_var, weight, bias, eps, relu=True
    )
    return restore(y)


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
        # channels_last input stays channels_last, without a copy (kernel_layout)
        return _batch_norm_validated(
            x,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.backend,
        )


class BatchNorm1d(_KernelMixin, modules.BatchNorm1d):
    """bnlab.nn.modules.BatchNorm1d computed by the kernels; ``backend`` as a keyword."""


class BatchNorm2d(_KernelMixin, modules.BatchNorm2d):
    """bnlab.nn.modules.BatchNorm2d computed by the kernels; ``backend`` as a keyword."""
