"""The kernels behind autograd: a functional drop-in and BatchNorm modules.

``backend`` names the kernel set: "cpu" (:mod:`bnlab.kernels.cpu`) or "cuda"
(:mod:`bnlab.kernels.cuda`: a GPU, or the simulator without one). Both modules offer
the same fused operations, so this file is written once for both. Arguments are checked
here, once, before any state changes. In eager mode the kernels run through
:class:`KernelBatchNormFunction`; while ``torch.compile`` traces, through the registered
operators of :mod:`bnlab.kernels.ops`, so ``torch.compile(model, fullgraph=True)`` over a
model with these modules keeps each kernel call whole and trains as eager mode does.

Serves notebook 04.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from bnlab.kernels import ops as kernel_ops
from bnlab.kernels.ops import (
    BACKENDS,
    NO_FORWARD_AD,
    NO_FUNC_TRANSFORMS,
    NO_HIGHER_ORDER,
    backend_module,
)
from bnlab.nn import functional as F
from bnlab.nn import modules

__all__ = [
    "BACKENDS",
    "NO_FORWARD_AD",
    "NO_FUNC_TRANSFORMS",
    "NO_HIGHER_ORDER",
    "BatchNorm1d",
    "BatchNorm2d",
    "KernelBatchNormFunction",
    "batch_norm",
    "batch_norm_relu",
    "kernel_layout",
]


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
    refuse_forward_mode(x, weight, bias)
    return _batch_norm_validated(
        x, running_mean, running_var, weight, bias, training, momentum, eps, backend
    )


def _batch_norm_validated(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    backend,
    num_batches_tracked=None,
) -> Tensor:
    """:func:`batch_norm` after ``validate_batch_norm_args`` (the modules validate first).

    ``momentum`` None (modules only): the cumulative average, 1 / ``num_batches_tracked``.
    """
    if x.numel() == 0:  # an empty batch: nothing for a kernel to do, and no statistics to update
        factor = F.averaging_factor(momentum, num_batches_tracked)
        return F.batch_norm_validated(
            x, running_mean, running_var, weight, bias, training, factor, eps
        )
    rows, restore = kernel_layout(x)
    args = (rows, weight, bias, running_mean, running_var, training, momentum)
    args += (num_batches_tracked, eps, backend)
    if torch.compiler.is_compiling():
        return restore(_through_ops(*args))
    try:
        y = KernelBatchNormFunction.apply(*args)
    except RuntimeError as err:  # torch.func's grad, vjp, vmap refuse it before it runs
        if "setup_context" in str(err):
            raise RuntimeError(NO_FUNC_TRANSFORMS) from err
        raise
    return restore(y)


def _through_ops(
    rows, weight, bias, running_mean, running_var, training, momentum, count, eps, backend
) -> Tensor:
    """The forward by the registered operators (while torch.compile traces): y in rows' layout."""
    if not training:
        y, _, _ = kernel_ops.batch_norm_eval(
            rows, running_mean, running_var, weight, bias, eps, False, backend
        )
        return y
    y, _, _, new_mean, new_var = kernel_ops.batch_norm_train(
        rows, weight, bias, running_mean, running_var, momentum, count, eps, backend
    )
    if running_mean is not None:  # the operator is functional: the buffers are updated here
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y


class KernelBatchNormFunction(torch.autograd.Function):
    """Eager mode: one kernel call per phase, the running buffers updated in place.

    The same calls and backward formula as the registered operators of
    :mod:`bnlab.kernels.ops` (which torch.compile uses), with less Python
    around them (a Function with ``setup_context`` binds its arguments by signature at
    every call: slower). ``training=True``: batch statistics (and, when running buffers
    are given, their update); backward by the compact formula. ``training=False``: running
    statistics, and dx = dy * weight * invstd. ``x`` arrives contiguous in the kernels'
    layout: (N, C, *), or the (rows, C) view of a channels_last tensor.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, count, eps, backend
    ):
        if training:
            y, mean, invstd = kernel_ops.run_train(
                x, weight, bias, running_mean, running_var, momentum, count, eps, backend
            )
        else:
            y, mean, invstd = kernel_ops.run_eval(
                x, running_mean, running_var, weight, bias, eps, False, backend
            )
        kernel_ops.save(ctx, x, weight, mean, invstd, training, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, dweight, dbias = kernel_ops.gradients(ctx, dy, kernel_ops.run_backward)
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip


def refuse_forward_mode(*tensors: Tensor | None) -> None:
    """Raise NO_FORWARD_AD if any tensor carries a forward-mode tangent (torch.func.jvp,
    torch.autograd.forward_ad), before anything is computed or updated.

    Needed because an operator without a forward-mode formula would otherwise return
    its output with a zero tangent, silently, when no input requires a gradient.
    """
    if torch.compiler.is_compiling() or fwAD._current_level < 0:  # no dual level is open
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(NO_FORWARD_AD)


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
    refuse_forward_mode(x, weight, bias)
    if x.numel() == 0:
        return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps))
    rows, restore = kernel_layout(x)
    # no gradient to register: eager mode calls the kernel directly (less Python per call)
    evaluate = kernel_ops.batch_norm_eval if torch.compiler.is_compiling() else kernel_ops.run_eval
    y, _, _ = evaluate(rows, running_mean, running_var, weight, bias, eps, True, backend)
    return restore(y)


class _KernelMixin:
    """Route a bnlab BatchNorm module's functional call through the kernels.

    The train/eval logic stays in bnlab.nn.modules._BatchNorm.forward; only its
    ``_normalize`` hook is replaced; ``backend`` is a keyword of the constructor. One
    case is taken over: training with ``momentum=None``, whose factor 1/num_batches_tracked
    the base class reads as a Python float, which torch.compile cannot do without stopping
    the graph; here the operator reads the counter itself.
    """

    def __init__(self, *args, backend: str = "cpu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        backend_module(backend)  # an unknown backend fails here, not at the first forward
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        refuse_forward_mode(x, self.weight, self.bias)  # before num_batches_tracked moves
        counting = self.training and self.track_running_stats
        if self.momentum is not None or not counting or self.num_batches_tracked is None:
            return super().forward(x)
        self._check_input_dim(x)  # the base class's checks, all before the counter moves
        F.validate_batch_norm_args(
            x, self.running_mean, self.running_var, self.weight, True, self.eps, self.bias
        )
        self.num_batches_tracked.add_(1)
        return _batch_norm_validated(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            True, None, self.eps, self.backend, self.num_batches_tracked,
        )  # fmt: skip

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
