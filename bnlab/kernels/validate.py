"""Input checks shared by the CPU and CUDA kernel wrappers: one place, clear messages.

The kernels index raw memory, so they accept only what they were compiled for:
contiguous float32 or float64 tensors, per-channel vectors of shape (C,) in the same
dtype and on the same device. Anything else raises, naming the argument and the fix.

Serves notebook 04.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.nn import functional as F

DTYPES = (torch.float32, torch.float64)
# A backend's (device type, remedy): where its kernels need their tensors, and how to get there.
Device = tuple[str, str]


def validate_tensor(t, name: str) -> None:
    """Raise unless ``t`` is a contiguous float32/float64 torch tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (got {type(t).__name__}); "
            f"wrap a NumPy array with torch.from_numpy({name})"
        )
    if t.dtype not in DTYPES:
        raise TypeError(
            f"the kernels are compiled for float32 and float64, got {name} of dtype {t.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (got shape {tuple(t.shape)} with strides {t.stride()}); "
            f"call {name}.contiguous() first"
        )


def validate_device(x: Tensor, device_type: str, remedy: str) -> None:
    """Raise unless ``x`` lives on ``device_type`` ("cpu" or "cuda")."""
    if not isinstance(x, Tensor):
        validate_tensor(x, "input")
    if x.device.type != device_type:
        raise ValueError(f"input is on {x.device}, expected a {device_type} tensor: {remedy}")


def validate_inputs(
    x: Tensor, *vectors: tuple[str, Tensor], device: Device | None = None
) -> tuple[int, int, int]:
    """Check x (N, C, *), on ``device`` when given, and per-channel vectors; return (N, C, HW)."""
    if device is not None:
        validate_device(x, *device)
    validate_tensor(x, "input")
    F.validate_rank(x.dim())
    n, c = x.shape[0], x.shape[1]
    for name, v in vectors:
        validate_tensor(v, name)
        if v.shape != (c,):
            raise ValueError(
                f"{name} must have shape ({c},), one value per channel of the input of shape "
                f"{tuple(x.shape)}, got {tuple(v.shape)}"
            )
        if v.dtype != x.dtype or v.device != x.device:
            raise TypeError(
                f"{name} is {v.dtype} on {v.device} but the input is {x.dtype} on {x.device}; "
                f"use {name}.to(input)"
            )
    hw = x.numel() // (n * c) if n * c else 0
    return n, c, hw


def validate_like(t: Tensor, x: Tensor, name: str) -> None:
    """Raise unless ``t`` has x's shape, dtype and device and is contiguous."""
    validate_tensor(t, name)
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(
            f"{name} must match the input: shape {tuple(x.shape)}, {x.dtype} on {x.device} "
            f"(got shape {tuple(t.shape)}, {t.dtype} on {t.device})"
        )


def validate_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor) -> None:
    """The four (C,) vectors of a running-statistics update agree in shape, dtype, device."""
    validate_tensor(mean, "mean")
    probe = mean.reshape(1, -1)  # a (1, C) stand-in input, so validate_inputs can compare
    validate_inputs(
        probe, ("running_mean", running_mean), ("running_var", running_var), ("var", var)
    )


def _affine_or_identity(
    x: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """weight/bias, with ones/zeros standing in for a missing one (affine=False)."""
    c = x.shape[1] if isinstance(x, Tensor) and x.dim() >= 2 else 0
    if weight is None:
        weight = torch.ones(c, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(c, dtype=x.dtype, device=x.device)
    return weight, bias


# One check per kernel operation, shared by the CPU and CUDA wrappers (``device`` differs).


def validate_stats_args(x: Tensor, eps: float, device: Device) -> tuple[int, int, int]:
    """channel_stats: x (N, C, *) on ``device``, eps > 0, more than one value per channel.

    Returns (N, C, HW).
    """
    return validate_forward_args(x, eps, device, training=True)


def validate_forward_args(
    x: Tensor, eps: float, device: Device, training: bool, **vectors: Tensor | None
) -> tuple[int, int, int]:
    """A fused forward: x (N, C, *) on ``device``, eps > 0, the given (C,) vectors like x
    (None ones skipped), and in training more than one value per channel. (N, C, HW)."""
    shape = _forward_args_pass(x, eps, device[0], training, vectors.values())
    if shape is not None:
        return shape
    shape = validate_inputs(
        x, *((k, v) for k, v in vectors.items() if v is not None), device=device
    )
    F.validate_eps(eps)
    if training:
        F.validate_batch_size(x)
    return shape


def validate_normalize_args(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    device: Device,
) -> tuple[int, int, Tensor, Tensor]:
    """normalize: x (N, C, *) on ``device``, the rest (C,) like x.

    Returns (C, HW, weight, bias), with ones/zeros for a missing weight/bias.
    """
    weight, bias = _affine_or_identity(x, weight, bias)
    vectors = (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias))
    _, c, hw = validate_inputs(x, *vectors, device=device)
    return c, hw, weight, bias


def validate_backward_reduce_args(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, device: Device
) -> tuple[int, int, int]:
    """backward_reduce: x (N, C, *) on ``device``, mean/invstd (C,), dy like x; (N, C, HW)."""
    shape = validate_inputs(x, ("mean", mean), ("invstd", invstd), device=device)
    validate_like(dy, x, "grad_output")
    return shape


def validate_backward_elementwise_args(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    device: Device,
) -> tuple[int, int, Tensor]:
    """backward_elementwise: x (N, C, *) on ``device``, dy like x, the rest (C,) like x.

    Returns (C, HW, weight), with ones for a missing weight.
    """
    weight, _ = _affine_or_identity(x, weight, None)
    vectors = (("mean", mean), ("invstd", invstd), ("weight", weight), ("sum_dy", sum_dy))
    _, c, hw = validate_inputs(x, *vectors, ("sum_dy_xhat", sum_dy_xhat), device=device)
    validate_like(dy, x, "grad_output")
    return c, hw, weight


def validate_backward_args(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, device: Device
) -> tuple[int, int, int]:
    """A fused backward: x (N, C, *) on ``device``, weight (C,) like x or None, dy like x,
    mean and invstd (C,) of a float dtype (the forward's float64). Returns (N, C, HW)."""
    shape = _backward_args_pass(dy, x, mean, invstd, weight, device[0])
    if shape is not None:
        return shape
    shape = validate_inputs(x, *(() if weight is None else (("weight", weight),)), device=device)
    validate_like(dy, x, "grad_output")
    for name, v in (("mean", mean), ("invstd", invstd)):
        if not isinstance(v, Tensor) or v.shape != (shape[1],) or v.dtype not in DTYPES:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"{name} must be a ({shape[1]},) float32/float64 tensor, as the forward returned "
                f"it (got {got}); pass the forward's {name} unchanged"
            )
    return shape


# The checks above build messages and walk every rule; a training step calls them twice
# (forward, backward), ~20 us, a noticeable share of a small kernel call. The quick paths
# below answer only "everything passes" (the shape) or "ask the full checks" (None), so a
# failing argument is still reported by the code above, with its message.


def _vector_like(v, x: Tensor, c: int) -> bool:
    return (
        isinstance(v, Tensor)
        and v.dtype == x.dtype
        and v.dim() == 1
        and v.shape[0] == c
        and v.device == x.device
        and v.is_contiguous()
    )


def _input_shape(x, device_type: str) -> tuple[int, int, int] | None:
    """(N, C, HW) of a contiguous float32/float64 x of 2+ dimensions on device_type, else None."""
    if not (
        isinstance(x, Tensor)
        and x.dtype in DTYPES
        and x.dim() >= 2
        and x.device.type == device_type
        and x.is_contiguous()
    ):
        return None
    n, c = x.shape[0], x.shape[1]
    if n * c == 0:
        return None
    return n, c, x.numel() // (n * c)


def _forward_args_pass(x, eps, device_type: str, training: bool, vectors) -> tuple | None:
    """validate_forward_args's shape when all its checks would pass, found quickly; else None."""
    shape = _input_shape(x, device_type)
    if shape is None or not (type(eps) is float and 0.0 < eps < float("inf")):
        return None
    if training and shape[0] * shape[2] == 1:
        return None
    for v in vectors:
        if v is not None and not _vector_like(v, x, shape[1]):
            return None
    return shape


def _backward_args_pass(dy, x, mean, invstd, weight, device_type: str) -> tuple | None:
    """validate_backward_args's shape when all its checks would pass, found quickly; else None."""
    shape = _input_shape(x, device_type)
    if shape is None or (weight is not None and not _vector_like(weight, x, shape[1])):
        return None
    if not (
        isinstance(dy, Tensor)
        and dy.dtype == x.dtype
        and dy.shape == x.shape
        and dy.device == x.device
        and dy.is_contiguous()
    ):
        return None
    for v in (mean, invstd):
        if not (isinstance(v, Tensor) and v.dtype in DTYPES and v.dim() == 1):
            return None
        if v.shape[0] != shape[1]:
            return None
    return shape
