"""The kernels as registered torch operators (namespace ``bnlab``), so torch.compile can use them.

``torch.compile`` cannot see into a Numba kernel. A registered operator is a node that
Dynamo, AOTAutograd and Inductor keep whole: they learn its output shapes from a *fake*
implementation (shapes and dtypes, no data), its gradient from the formula registered
with it, and from its schema that it writes none of its inputs. Three operators, one per
phase, each one call of a backend (:mod:`bnlab.kernels.cpu` or :mod:`bnlab.kernels.cuda`),
named by the ``backend`` string rather than by the tensors' device, because the "cuda"
backend may be Numba's simulator working on CPU tensors:

- ``bnlab::batch_norm_train``: y, the batch's (mean, invstd) and the updated running
  statistics, which the caller copies into its buffers;
- ``bnlab::batch_norm_eval``: y from the running statistics, optionally ReLU in the same pass;
- ``bnlab::batch_norm_backward``: (dx, dgamma, dbeta) from dy and what a forward saved.

The operators take the kernels' layout (x contiguous: (N, C, *) or the (rows, C) view of
a channels_last tensor, see :func:`bnlab.kernels.autograd.kernel_layout`) and validated
arguments; :mod:`bnlab.kernels.autograd` is the public entry. It calls the operators
while torch.compile traces, and in eager mode the same ``run_*`` functions through an
``autograd.Function``: a registered operator costs several times the Python per call
(the dispatcher, schema defaults, alias checks), which at small shapes outweighs the
kernel. Forward-mode AD and double backward are refused (:data:`NO_FORWARD_AD`,
:data:`NO_HIGHER_ORDER`), and so are torch.func's transforms (:data:`NO_FUNC_TRANSFORMS`).

Serves notebook 04.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

BACKENDS = ("cpu", "cuda")

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

NO_FUNC_TRANSFORMS = (
    "the Numba kernels do not run under torch.func transforms (grad, vjp, jacrev, vmap); "
    "use torch.autograd.grad for first-order gradients, or bnlab.modules.BatchNorm1d/2d "
    "(or bnlab.functional.batch_norm), which torch.func.grad and jvp can differentiate"
)


_MODULES: dict = {}  # backend -> its kernel module, imported at first use


def backend_module(backend: str):
    """The kernel module for ``backend`` ("cpu" or "cuda"); importing "cuda" picks GPU/simulator."""
    module = _MODULES.get(backend)
    if module is None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        module = _MODULES[backend] = importlib.import_module(f"bnlab.kernels.{backend}")
    return module


def stats_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the (mean, invstd) a forward saves for its backward.

    The CPU kernels keep them in float64 (as torch's CPU kernel does), the CUDA kernels in
    x's own dtype. The fake implementations must know it without running a kernel, and
    the backward hands the same tensors back to the backend that made them.
    """
    return torch.float64 if backend == "cpu" else dtype


# --- one kernel call per phase (the eager path calls these directly) --------------------


def run_train(
    x, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps, backend
):
    """Training forward: (y, mean, invstd); the running buffers (or None) updated in place.

    ``momentum`` None is the cumulative average: the factor is 1 / ``num_batches_tracked``
    (already counting this batch). It is read here, inside the kernel call, so that a
    compiled graph does not have to stop to make a Python number of a tensor.
    """
    if momentum is None:
        momentum = 0.0 if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
    return backend_module(backend).forward_train(
        x, weight, bias, running_mean, running_var, momentum, eps
    )


def run_eval(x, running_mean, running_var, weight, bias, eps, relu, backend):
    """Eval forward from the running statistics: (y, mean, invstd), ReLU fused when ``relu``.

    mean is a snapshot of the running mean: the backward must not see a later update.
    """
    return backend_module(backend).forward_eval(
        x, running_mean, running_var, weight, bias, eps, relu=relu
    )


def run_backward(dy, x, mean, invstd, weight, batch_stats, backend):
    """(dx, dgamma, dbeta); ``batch_stats`` False: the eval-mode gradient, in which mean and
    invstd are constants, dx = dy * weight * invstd."""
    return backend_module(backend).backward_train(
        dy, x, mean, invstd, weight, batch_stats=batch_stats
    )


def gradients(ctx, dy: Tensor, backward) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dx, dweight, dbias) from what a forward saved (``save``), by ``backward``:
    :func:`run_backward` or the operator around it. Shared by every autograd formula."""
    if torch.is_grad_enabled():  # create_graph=True: someone will differentiate dx again
        raise RuntimeError(NO_HIGHER_ORDER)
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dgamma, dbeta = backward(
        dy.contiguous(), x, mean, invstd, weight, ctx.training, ctx.backend
    )
    return dx, (dgamma if weight is not None else None), dbeta


def save(ctx, x, weight, mean, invstd, training: bool, backend: str) -> None:
    """What :func:`gradients` reads."""
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training, ctx.backend = training, backend


# --- the registered operators -----------------------------------------------------------


def _own(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A (C,) result in ``dtype``, in memory of its own: an operator's outputs may not alias
    each other or an input, and a backend may return rows of one work buffer (a (C,)
    copy costs next to nothing)."""
    return t.to(dtype) if t.dtype != dtype else t.clone()


def _contiguous(t: Tensor | None) -> Tensor | None:
    # a no-op for what the public entry passes; a compiled graph may hand over other strides
    return None if t is None else t.contiguous()


def _fake_forward(x: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty(x.shape[1], dtype=stats_dtype(backend, x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("bnlab::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`run_train` as a function: (y, mean, invstd, new running_mean, new running_var).

    The running buffers are read, not written: their updated values come back (empty when
    no buffers are given) for the caller to ``copy_`` in, a torch operation a compiled
    graph keeps. (An operator that writes its inputs cannot have an autograd formula.)
    """
    if running_mean is None or running_var is None:
        new_mean = new_var = None
    else:  # the kernels update in place: give them copies
        new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = run_train(
        x.contiguous(), _contiguous(weight), _contiguous(bias), new_mean, new_var,
        momentum, num_batches_tracked, eps, backend,
    )  # fmt: skip
    if new_mean is None:
        new_mean, new_var = x.new_empty(0), x.new_empty(0)
    want = stats_dtype(backend, x.dtype)
    return y, _own(mean, want), _own(invstd, want), new_mean, new_var


@batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, num_batches_tracked, eps, backend):
    running = x.new_empty(0) if running_mean is None else torch.empty_like(running_mean)
    return *_fake_forward(x, backend), running, running.clone()


@torch.library.custom_op("bnlab::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`run_eval` as an operator: (y, mean, invstd)."""
    y, mean, invstd = run_eval(
        x.contiguous(), running_mean.contiguous(), running_var.contiguous(),
        _contiguous(weight), _contiguous(bias), eps, relu, backend,
    )  # fmt: skip
    want = stats_dtype(backend, x.dtype)
    return y, _own(mean, want), _own(invstd, want)


@batch_norm_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, relu, backend):
    return _fake_forward(x, backend)


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    batch_stats: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`run_backward` as an operator: (dx, dgamma, dbeta)."""
    dx, dgamma, dbeta = run_backward(
        dy.contiguous(), x.contiguous(), mean, invstd, _contiguous(weight), batch_stats, backend
    )
    return dx, _own(dgamma, x.dtype), _own(dbeta, x.dtype)


@batch_norm_backward.register_fake
def _(dy, x, mean, invstd, weight, batch_stats, backend):
    sums = x.new_empty(x.shape[1])
    return torch.empty_like(x, memory_format=torch.contiguous_format), sums, sums.clone()


# --- their autograd formulas: both forwards share one backward --------------------------


def _setup_train(ctx, inputs, output) -> None:
    x, weight, *_, backend = inputs
    # only y has a gradient: the statistics, and the running ones the caller copies into
    # its buffers, are not differentiated (nor are they by torch's batch_norm)
    ctx.mark_non_differentiable(*output[1:])
    save(ctx, x, weight, output[1], output[2], True, backend)


def _setup_eval(ctx, inputs, output) -> None:
    x, _, _, weight, *_, backend = inputs
    ctx.mark_non_differentiable(*output[1:])
    save(ctx, x, weight, output[1], output[2], False, backend)


def _backward_train(ctx, dy, *_no_grads):
    dx, dweight, dbias = gradients(ctx, dy, batch_norm_backward)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dweight if needs[1] else None,
        dbias if needs[2] else None,
        None, None, None, None, None, None,
    )  # fmt: skip


def _backward_eval(ctx, dy, *_no_grads):
    dx, dweight, dbias = gradients(ctx, dy, batch_norm_backward)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        None, None,
        dweight if needs[3] else None,
        dbias if needs[4] else None,
        None, None, None,
    )  # fmt: skip


batch_norm_train.register_autograd(_backward_train, setup_context=_setup_train)
batch_norm_eval.register_autograd(_backward_eval, setup_context=_setup_eval)
