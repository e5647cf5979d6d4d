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
import numbers

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------
# Validation: one place, messages in torch's style that also name the remedy.
# ---------------------------------------------------------------------------------


class ShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape: a ValueError, and a RuntimeError as torch raises for it.

    Code written against torch (``except RuntimeError``) catches it as it catches torch's.
    """


class DeviceError(ValueError, RuntimeError):
    """A tensor on another device than the input: a ValueError, and a RuntimeError as torch
    raises for it (``except RuntimeError`` catches it as it catches torch's)."""


def validate_floating(x: Tensor, name: str = "input") -> None:
    """Raise if ``x`` is not a floating-point tensor."""
    if not x.is_floating_point():
        raise TypeError(
            f"batch norm expects a floating-point {name} (got dtype {x.dtype}); "
            f"convert it first, e.g. {name}.float()"
        )


def validate_eps(eps: float) -> None:
    """Raise unless eps > 0 (eps keeps the division defined for a constant channel)."""
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number (got eps={eps!r}); the default is 1e-5")


def validate_momentum(momentum: float | None) -> None:
    """Raise unless momentum is None (cumulative average) or in [0, 1]."""
    if momentum is None:
        return
    # numbers.Real: Python and NumPy scalars alike (torch accepts np.float32(0.1) too)
    if not (isinstance(momentum, numbers.Real) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be in [0, 1] or None (got momentum={momentum!r}); PyTorch weighs "
            "the new batch by momentum (default 0.1). A Keras-style momentum of 0.99 is "
            "1 - 0.99 = 0.01 here: see bnlab.functional.convert_momentum"
        )


def validate_rank(ndim: int, minimum: int = 2, layout: str = "(N, C, ...)") -> None:
    """Raise unless an input has at least ``minimum`` dimensions: BN needs (N, C, ...)."""
    if ndim < minimum:
        raise ValueError(
            f"expected an input of at least {minimum} dimensions {layout}, got {ndim}D; "
            "give it the missing axes, e.g. x.unsqueeze(1) for a single channel"
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
        raise ShapeError(
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
    for running, batch in ((running_mean, batch_mean), (running_var, unbiased)):
        # torch's order, in its accumulation type (float32 for half-precision buffers)
        acc = accumulation_view(running)
        running.copy_(momentum * batch.to(acc.dtype) + (1.0 - momentum) * acc)


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


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    return (x - per_channel(mean, x)) * per_channel(invstd, x)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    out = xhat if weight is None else xhat * per_channel(weight, xhat)
    return out if bias is None else out + per_channel(bias, xhat)


class BatchNormFunction(torch.autograd.Function):
    """Normalize with the given statistics and apply the affine map; backward by hand.

    ``training=True``: mean and invstd are the batch's, so they depend on x and the
    backward is the compact formula. ``training=False``: they are constants (running
    statistics), and the map is affine in x: dx = dout * gamma * invstd.

    Higher derivatives (``create_graph=True``: gradient penalties, Hessian-vector
    products) differentiate the forward again with autograd, from the saved input, so the
    gradient is itself differentiable. Forward-mode AD (``torch.func.jvp``) has its own
    formula, the tangent of x_hat: ``invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx))``.
    """

    @staticmethod
    def forward(x, weight, bias, mean, invstd, training, eps):
        return _affine(_normalized(x, mean, invstd), weight, bias).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, mean, invstd, training, eps = inputs
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.set_materialize_grads(False)  # None, not zeros, for inputs without a tangent

    @staticmethod
    def backward(ctx, dout):
        if dout is None:  # the output took no part in the loss
            return None, None, None, None, None, None, None
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
            return (
                *_differentiable_grads(ctx, dout, x, weight, bias, mean, invstd),
                None,
                None,
                None,
                None,
            )
        xhat = _normalized(x, mean, invstd)
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
        if bias is not None and ctx.needs_input_grad[2]:
            dbeta = dout_acc.sum(dim=dims).to(bias.dtype)
        return dx, dgamma, dbeta, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, dmean, dinvstd, _training, _eps):
        if not ctx.training and dx is not None and (dmean is not None or dinvstd is not None):
            raise RuntimeError(  # torch's message for dual running statistics
                "batch_norm is not differentiable wrt running_mean and running_var: pass "
                "them without a tangent (they are statistics, not inputs)"
            )
        x, weight, mean, invstd = ctx.saved_tensors
        xhat = _normalized(x, mean, invstd)
        dims = reduce_dims(xhat)
        out = torch.zeros_like(xhat)
        if dx is None and dweight is None and dbias is None:  # tangents of statistics only
            return out
        if dx is not None:
            if ctx.training:  # the batch statistics move with x
                dx = dx - dx.mean(dim=dims, keepdim=True)
                dx = dx - xhat * (xhat * dx).mean(dim=dims, keepdim=True)
            dxhat = dx * per_channel(invstd, xhat)
            out = out + (dxhat if weight is None else dxhat * per_channel(weight, xhat))
        if dweight is not None:
            out = out + xhat * per_channel(dweight, xhat)
        if dbias is not None:
            out = out + per_channel(dbias, xhat)
        return out


def _differentiable_grads(ctx, dout, x, weight, bias, mean, invstd) -> list[Tensor | None]:
    """(dx, dweight, dbias) as a graph of tensor operations, for derivatives of derivatives."""
    needs = ctx.needs_input_grad[:3]
    wanted = [t if need else None for t, need in zip((x, weight, bias), needs, strict=True)]
    inputs = [t for t in wanted if t is not None]
    if not inputs:
        return [None, None, None]
    with torch.enable_grad():
        if ctx.training:  # recompute the statistics as functions of x
            batch_mean, batch_var = batch_stats(x)
            mean, invstd = batch_mean, torch.rsqrt(batch_var + ctx.eps)
        out = _affine(_normalized(x, mean, invstd), weight, bias)
        grads = iter(torch.autograd.grad(out, inputs, dout, create_graph=True, allow_unused=True))
    return [next(grads) if t is not None else None for t in wanted]


def validate_vector(t: Tensor | None, name: str, x: Tensor) -> None:
    """Raise unless ``t`` is None or a floating (C,) tensor on ``x``'s device, C = x.shape[1]."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None (got {type(t).__name__})")
    if t.dim() != 1 or t.numel() != x.shape[1]:
        raise ShapeError(
            f"{name} must have shape ({x.shape[1]},), one value per channel of the input of "
            f"shape {tuple(x.shape)} (got {name} of shape {tuple(t.shape)})"
        )
    validate_floating(t, name)
    if t.device != x.device:
        raise DeviceError(
            f"{name} is on {t.device} but the input is on {x.device}; move it with "
            f"{name}.to(input.device)"
        )


def validate_batch_norm_args(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    training: bool,
    eps: float,
    bias: Tensor | None = None,
) -> None:
    """Every check batch_norm makes, all before any buffer changes (scratch and kernels)."""
    validate_floating(x)
    validate_eps(eps)
    validate_rank(x.dim())
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        validate_vector(t, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "pass running_mean and running_var together, or neither (got only "
            f"{'running_mean' if running_var is None else 'running_var'})"
        )
    if training:
        validate_batch_size(x)
    elif running_mean is None:
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
    vectors = (running_mean, running_var, weight, bias)
    if x.dim() == 1 and x.numel() == 0 and all(t is None or t.numel() == 0 for t in vectors):
        return x.clone()  # torch accepts an empty 1-D input with empty statistics: nothing to do
    validate_batch_norm_args(x, running_mean, running_var, weight, training, eps, bias)
    return batch_norm_validated(x, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_validated(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """:func:`batch_norm` for arguments that ``validate_batch_norm_args`` already accepted.

    The modules validate a call before their counter moves, then come here: the checks run
    once per forward, not twice.
    """
    xs = accumulation_view(x)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if training and count == 0:
        # An empty batch (N = 0 or a zero-size spatial axis): torch returns an empty output
        # and leaves the running statistics alone. The values below touch no element.
        mean = torch.zeros(x.shape[1], dtype=xs.dtype, device=x.device)
        var = torch.ones_like(mean)
    elif training:
        with torch.no_grad():  # the backward accounts for the statistics' dependence on x
            mean, var = batch_stats(xs)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var = running_mean.to(xs.dtype), running_var.to(xs.dtype)
    invstd = torch.rsqrt(var + eps)
    out = BatchNormFunction.apply(xs, weight, bias, mean, invstd, training, eps)
    return out.to(x.dtype)
