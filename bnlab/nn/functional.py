"""Batch Normalization as plain tensor math: forward, backward, running statistics.

Shapes: ``x`` is (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W). Statistics are
per channel C, reduced over every other axis; ``m = x.numel() // C`` values each.

Forward (training), per channel:

    mean = sum(x) / m
    var  = sum((x - mean)^2) / m                (biased: this normalizes)
    x_hat = (x - mean) / sqrt(var + eps)
    y = gamma * x_hat + beta

Running statistics, PyTorch's convention (momentum weighs the *new* value):

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

With ``momentum=None`` the module uses ``1 / num_batches_tracked``, a cumulative average.

Serves notebooks 02 and 03.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------
# Validation: one place, messages in torch's style that also name the remedy.
# ---------------------------------------------------------------------------------


def validate_floating(x: Tensor, name: str = "input") -> None:
    """Raise if ``x`` is not a floating-point tensor."""
    if not x.is_floating_point():
        raise TypeError(
            f"batch norm expects a floating-point {name} (got dtype {x.dtype}); "
            f"convert it first, e.g. {name}.float()"
        )


def validate_eps(eps: float) -> None:
    """Raise unless eps > 0 (eps keeps the division defined for a constant channel)."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number (got eps={eps!r}); the default is 1e-5")


def validate_momentum(momentum: float | None) -> None:
    """Raise unless momentum is None (cumulative average) or in [0, 1]."""
    if momentum is None:
        return
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be in [0, 1] or None (got momentum={momentum!r}); PyTorch weighs "
            "the new batch by momentum (default 0.1). A Keras-style momentum of 0.99 is "
            "1 - 0.99 = 0.01 here: see bnlab.functional.convert_momentum"
        )


def validate_rank(ndim: int, minimum: int = 2, layout: str = "(N, C, ...)") -> None:
    """Raise unless an input has at least ``minimum`` dimensions: BN needs (N, C, ...)."""
    if ndim < minimum:
        raise ValueError(
            f"expected an input of at least {minimum} dimensions {layout}, got {ndim}D"
        )


def validate_batch_size(x: Tensor) -> None:
    """Raise when training would see a single value per channel (torch's condition)."""
    validate_rank(x.dim())
    values_per_channel = x.numel() // x.shape[1] if x.shape[1] else 0
    if values_per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}; use a batch of at least 2 (drop_last=True in the DataLoader "
            "drops a final batch of 1), or call model.eval() to use the running statistics"
        )


def validate_channels(x: Tensor, num_channels: int, what: str = "running_mean") -> None:
    """Raise if the input's channel axis (dim 1) does not have ``num_channels`` entries."""
    if x.dim() < 2 or x.shape[1] != num_channels:
        got = x.shape[1] if x.dim() >= 2 else "none"
        raise ValueError(
            f"expected input with {num_channels} channels in dimension 1 (to match {what}), "
            f"got {got} in input of shape {tuple(x.shape)}"
        )


# ---------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The axes BN reduces over: every axis but the channel axis 1, e.g. (0, 2, 3) for 4-D."""
    return (0, *range(2, x.dim()))


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) vector to (1, C, 1, ...) so it broadcasts against ``x``."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def accumulation_view(x: Tensor) -> Tensor:
    """``x`` in the dtype BN computes in: float32 for half-precision input, as torch does."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and *biased* variance of ``x``: two (C,) tensors.

    Half-precision input is accumulated in float32, as torch does.
    """
    xs = accumulation_view(x)
    dims = reduce_dims(xs)
    mean = xs.mean(dim=dims)
    var = (xs - per_channel(mean, xs)).square().mean(dim=dims)
    return mean, var


def convert_momentum(momentum: float, to: str = "pytorch") -> float:
    """Convert a running-average momentum between conventions.

    PyTorch weighs the new batch value by ``momentum``; Keras, TensorFlow, CS231n and
    d2l weigh the *old* running value by theirs. So PyTorch 0.1 == Keras 0.9, and
    Keras' default 0.99 == PyTorch 0.01. The map is its own inverse: ``1 - m``.
    ``to`` names the target convention: "pytorch" or "keras" (old-value weight).
    """
    if to not in ("pytorch", "keras"):
        raise ValueError(f"to must be 'pytorch' or 'keras' (got {to!r})")
    validate_momentum(momentum)
    return 1.0 - momentum


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """Update running statistics in place, exactly as PyTorch does.

    ``batch_var`` is the biased variance used for normalization; the running variance
    stores the unbiased one, ``batch_var * count / (count - 1)``. ``momentum`` here is
    the factor actually applied (the module turns ``momentum=None`` into 1/num_batches).
    """
    unbiased = batch_var * (count / (count - 1))
    running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def averaging_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The factor applied to the new batch: ``momentum``, or 1/num_batches for None.

    Call after ``num_batches_tracked`` has been incremented for this batch.
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / float(num_batches_tracked)


# ---------------------------------------------------------------------------------
# Forward and backward by hand (CS231n style: forward returns a cache)
# ---------------------------------------------------------------------------------


def batchnorm_forward(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5
) -> tuple[Tensor, tuple]:
    """Training-mode forward, one node of the computational graph per line.

    Inputs:
    - x: (N, C, *) data
    - gamma, beta: (C,) scale and shift
    - eps: added to the variance inside the square root
    Returns ``(out, cache)``: out has x's shape; cache feeds the backward passes.
    """
    dims = reduce_dims(x)
    g, b = per_channel(gamma, x), per_channel(beta, x)
    mu = x.mean(dim=dims, keepdim=True)  # (1, C, 1, ...)
    xmu = x - mu  # centred
    sq = xmu**2
    var = sq.mean(dim=dims, keepdim=True)  # biased
    sqrtvar = torch.sqrt(var + eps)
    ivar = 1.0 / sqrtvar
    xhat = xmu * ivar
    out = g * xhat + b
    cache = (xhat, g, xmu, ivar, sqrtvar, var, eps, dims)
    return out, cache


def batchnorm_backward_staged(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """Backward through the graph of :func:`batchnorm_forward`, node by node in reverse.

    Inputs: dout (N, C, *) upstream gradient; cache from the forward.
    Returns (dx, dgamma, dbeta) with shapes (N, C, *), (C,), (C,).
    """
    xhat, g, xmu, ivar, sqrtvar, var, eps, dims = cache
    m = xhat.numel() // xhat.shape[1]
    dbeta = dout.sum(dim=dims)  # out = g*xhat + b
    dgamma = (dout * xhat).sum(dim=dims)
    dxhat = dout * g
    divar = (dxhat * xmu).sum(dim=dims, keepdim=True)  # xhat = xmu * ivar
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / sqrtvar**2 * divar  # ivar = 1 / sqrtvar
    dvar = 0.5 / torch.sqrt(var + eps) * dsqrtvar  # sqrtvar = sqrt(var + eps)
    dsq = dvar.expand_as(xhat) / m  # var = mean(sq)
    dxmu2 = 2 * xmu * dsq  # sq = xmu**2
    dxmu = dxmu1 + dxmu2
    dmu = -dxmu.sum(dim=dims, keepdim=True)  # xmu = x - mu
    dx = dxmu + dmu.expand_as(xhat) / m  # mu = mean(x)
    return dx, dgamma, dbeta


def batchnorm_backward_compact(dout: Tensor, cache: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """The same gradients from the simplified formula, one line for dx:

        dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat))

    Returns (dx, dgamma, dbeta) with shapes (N, C, *), (C,), (C,).
    """
    xhat, g, _xmu, ivar, *_rest, dims = cache
    dbeta = dout.sum(dim=dims)
    dgamma = (dout * xhat).sum(dim=dims)
    dx = (
        g
        * ivar
        * (
            dout
            - dout.mean(dim=dims, keepdim=True)
            - xhat * (dout * xhat).mean(dim=dims, keepdim=True)
        )
    )
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------------
# Autograd: forward with batch or fixed statistics, compact backward
# ---------------------------------------------------------------------------------


class BatchNormFunction(torch.autograd.Function):
    """Normalize with the given statistics and apply the affine map; backward by hand.

    ``training=True``: mean and invstd are the batch's, so they depend on x and the
    backward is the compact formula. ``training=False``: they are constants (running
    statistics), and the map is affine in x: dx = dout * gamma * invstd.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, training):  # noqa: D401 (autograd API)
        xhat = (x - per_channel(mean, x)) * per_channel(invstd, x)
        out = xhat
        if weight is not None:
            out = out * per_channel(weight, x)
        if bias is not None:
            out = out + per_channel(bias, x)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.training = training
        ctx.has_bias = bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        xhat, weight, invstd = ctx.saved_tensors
        dims = reduce_dims(xhat)
        dout_acc = dout.to(xhat.dtype)
        scale = per_channel(invstd, xhat)
        if weight is not None:
            scale = scale * per_channel(weight, xhat)
        dx = dgamma = dbeta = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                dx = scale * (
                    dout_acc
                    - dout_acc.mean(dim=dims, keepdim=True)
                    - xhat * (dout_acc * xhat).mean(dim=dims, keepdim=True)
                )
            else:
                dx = dout_acc * scale
            dx = dx.to(dout.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dgamma = (dout_acc * xhat).sum(dim=dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbeta = dout_acc.sum(dim=dims).to(weight.dtype if weight is not None else dout.dtype)
        return dx, dgamma, dbeta, None, None, None


def validate_batch_norm_args(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """The argument checks every batch_norm implementation shares (scratch and kernels)."""
    validate_floating(x)
    validate_eps(eps)
    validate_rank(x.dim())
    for name, t in (("running_mean", running_mean), ("weight", weight)):
        if t is not None:
            validate_channels(x, t.numel(), name)
    if training:
        validate_batch_size(x)
    elif running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required when training=False; pass "
            "training=True to normalize with the batch statistics"
        )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` built from the pieces above.

    Inputs: x (N, C, *); running_mean, running_var (C,) or None; weight, bias (C,)
    or None. ``training=True`` normalizes with the batch statistics and, when running
    buffers are given, updates them in place with factor ``momentum``.
    Returns a tensor of x's shape.
    """
    validate_batch_norm_args(x, running_mean, running_var, weight, training, eps)
    xs = accumulation_view(x)
    if training:
        with torch.no_grad():  # the backward accounts for the statistics' dependence on x
            mean, var = batch_stats(xs)
        if running_mean is not None and running_var is not None:
            update_running_stats(
                running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
            )
    else:
        mean, var = running_mean.to(xs.dtype), running_var.to(xs.dtype)
    invstd = torch.rsqrt(var + eps)
    out = BatchNormFunction.apply(xs, weight, bias, mean, invstd, training)
    return out.to(x.dtype)
