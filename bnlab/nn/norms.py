"""The normalization family: BatchNorm, LayerNorm, InstanceNorm and GroupNorm.

They are one computation with different axes. Each element ``x[i]`` is normalized with
the mean and (biased) variance of the elements that share its statistics:

    BatchNorm     (N, C, H, W): per channel, over N, H, W          axes (0, 2, 3)
    LayerNorm     (N, C, H, W): per sample, over C, H, W           axes (1, 2, 3)
    InstanceNorm  (N, C, H, W): per sample and channel, over H, W  axes (2, 3)
    GroupNorm(G)  (N, C, H, W): per sample and group of C/G channels, over those and H, W
                  = the axes (2, 3) of x viewed as (N, G, C/G * H * W)

:func:`normalize` does the reduction once: it moves the kept axes to the front, views
the tensor as (1, groups, m) and hands it to ``bnlab.nn.functional.batch_norm`` in training
mode, so every norm here shares BN's forward and hand-written backward. The affine step
(gamma, beta) is per channel for BN, GN and IN, and per element of ``normalized_shape``
for LN, as in torch.nn. Only BN keeps running statistics; the others need none, because
their statistics never involve other samples (Wu & He, "Group Normalization", 2018).

:func:`zca_whiten` is what BN is *not*: full whitening, which also removes the correlation
between features (notebook 02 compares the two).

Serves notebooks 02 and 08.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlab.nn import functional as F
from bnlab.nn import modules

KINDS = ("batch", "layer", "instance", "group")


def _canonical_dims(dims: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims:
        raise ValueError("dims must name at least one axis to reduce over (got an empty tuple)")
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"dims contains axis {d}, out of range for a {ndim}D input")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"dims must not repeat an axis (got {dims})")
    return tuple(sorted(out))


def normalize(
    x: Tensor, dims: int | Sequence[int], eps: float = 1e-5, single_value: str = "refuse"
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and biased variance taken over ``dims``.

    Inputs:
    - x: tensor of any shape (floating point)
    - dims: the axes reduced over; elements that differ only along them share statistics
    - eps: added to the variance
    - single_value: what one value per statistic gives: "refuse" (BatchNorm and InstanceNorm
      in torch raise) or "zero" (LayerNorm and GroupNorm in torch return x_hat = 0)
    Returns x_hat with x's shape. Gradients come from BN's backward
    (``bnlab.nn.functional.BatchNormFunction``): x is viewed as (1, groups, m), one "channel"
    per set of elements sharing statistics, m = product of the reduced sizes.
    """
    F.validate_floating(x)
    F.validate_eps(eps)
    dims = _canonical_dims(dims, x.dim())
    kept = [d for d in range(x.dim()) if d not in dims]
    m = math.prod(x.shape[d] for d in dims)
    if m < 2 and single_value == "zero":
        return (x - x) * eps**-0.5  # x - mean(x) is 0; its gradient is 0 too, as in torch
    if m < 2:
        raise ValueError(
            f"normalizing over axes {dims} of an input of shape {tuple(x.shape)} sees a single "
            "value per statistic, so every output would be 0; reduce over more axes or use a "
            "larger input (e.g. a batch of at least 2 for BatchNorm)"
        )
    perm = kept + list(dims)
    xp = x.permute(perm)
    groups = math.prod(x.shape[d] for d in kept)
    out = F.batch_norm(xp.reshape(1, groups, m), None, None, training=True, eps=eps)
    inverse = [perm.index(d) for d in range(x.dim())]
    return out.reshape(xp.shape).permute(inverse)


def reduction_axes(kind: str, ndim: int) -> tuple[int, ...]:
    """Axes that ``kind`` ("batch", "layer", "instance") reduces over for an (N, C, *) input.

    GroupNorm has no fixed axes of x: it reduces over axis 2 of x viewed as (N, G, -1).
    """
    F.validate_rank(ndim)
    axes = {
        "batch": (0, *range(2, ndim)),
        "layer": tuple(range(1, ndim)),
        "instance": tuple(range(2, ndim)),
    }
    if kind not in axes:
        raise ValueError(
            f"kind must be one of {sorted(axes)} (got {kind!r}); GroupNorm reduces over a "
            "reshaped tensor: see group_norm"
        )
    return axes[kind]


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, per_channel: bool) -> Tensor:
    """gamma * out + beta; per channel (axis 1) or elementwise over trailing axes."""
    shape = (lambda v: F.per_channel(v, out)) if per_channel else (lambda v: v)
    if weight is not None:
        out = out * shape(weight)
    if bias is not None:
        out = out + shape(bias)
    return out


def batch_norm_train(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Training-mode BatchNorm of (N, C, *) input via :func:`normalize` (no running stats)."""
    return _affine(normalize(x, reduction_axes("batch", x.dim()), eps), weight, bias, True)


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` axes, like torch.nn.functional.layer_norm.

    Inputs: x (*, *normalized_shape); weight, bias of shape normalized_shape or None.
    Returns x's shape.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape) :]) != shape or len(shape) > x.dim() or not shape:
        raise F.ShapeError(
            f"normalized_shape={shape} must equal the last axes of the input, got input of "
            f"shape {tuple(x.shape)}"
        )
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    return _affine(normalize(x, dims, eps, single_value="zero"), weight, bias, False)


def instance_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """InstanceNorm of (N, C, *) input: per sample and channel, over the spatial axes.

    Like torch.nn.functional.instance_norm without running statistics. weight, bias: (C,).
    """
    F.validate_rank(x.dim(), 3, "(N, C, L) or (N, C, H, W): instance norm needs spatial axes")
    return _affine(normalize(x, reduction_axes("instance", x.dim()), eps), weight, bias, True)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm of (N, C, *) input, like torch.nn.functional.group_norm.

    The C channels are split into ``num_groups`` consecutive groups; each sample and group
    is normalized over its C / G channels and all spatial positions: axis 2 of x viewed as
    (N, G, C/G * H * W). weight, bias: (C,), per channel. Returns x's shape.
    """
    F.validate_rank(x.dim())
    channels = x.shape[1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be a positive divisor of the {channels} channels"
        )
    per_group = channels // num_groups * math.prod(x.shape[2:])  # values per sample and group
    if x.shape[0] * per_group == 1:  # torch's condition (F.group_norm's _verify_batch_size)
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{list(x.shape)}: GroupNorm({num_groups}, {channels}) sees one value in all per "
            "group; use fewer groups, or a larger input (more samples or positions)"
        )
    grouped = normalize(x.reshape(x.shape[0], num_groups, per_group), 2, eps, single_value="zero")
    return _affine(grouped.reshape(x.shape), weight, bias, True)


# ----------------------------------------------------------------------------- modules


class _Affine(nn.Module):
    """Holds gamma (``weight``) and beta (``bias``) like torch.nn's norms, or None for each."""

    def __init__(
        self, shape: tuple[int, ...], affine: bool, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}  # torch's factory kwargs
        self.weight = nn.Parameter(torch.ones(shape, **kw)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape, **kw)) if affine and bias else None


class LayerNorm(_Affine):
    """Drop-in for torch.nn.LayerNorm (same arguments, parameters and state_dict keys)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        super().__init__(shape, elementwise_affine, bias, device, dtype)
        self.normalized_shape, self.eps = shape, eps

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(_Affine):
    """Drop-in for torch.nn.GroupNorm: ``num_groups`` groups of ``num_channels`` channels."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups={num_groups} must be a positive divisor of num_channels={num_channels}"
            )
        super().__init__((num_channels,), affine, bias, device, dtype)
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps

    def forward(self, x: Tensor) -> Tensor:
        F.validate_channels(x, self.num_channels, "num_channels")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class InstanceNorm2d(_Affine):
    """Drop-in for torch.nn.InstanceNorm2d: torch's arguments, defaults and state_dict keys.

    Each sample and channel is normalized over its H x W values. With
    ``track_running_stats=True`` the layer also keeps running statistics (the mean over the
    batch of the per-instance statistics) and eval mode normalizes with them, as torch's
    does; ``momentum=None`` then means 0, as in torch. Accepts (N, C, H, W) input and,
    as torch does, unbatched (C, H, W) input.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__((num_features,), affine, bias, device, dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        kw = {"device": device, "dtype": dtype}
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(
                f"InstanceNorm2d expected 4D (N, C, H, W) or unbatched 3D (C, H, W) input "
                f"(got {x.dim()}D input)"
            )
        if x.dim() == 3:  # unbatched: one sample
            return self.forward(x.unsqueeze(0)).squeeze(0)
        F.validate_channels(x, self.num_features, "num_features")
        if self.running_mean is None:
            return instance_norm(x, self.weight, self.bias, self.eps)
        return instance_norm_tracked(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats=self.training,
            momentum=0.0 if self.momentum is None else self.momentum,
            eps=self.eps,
        )


def instance_norm_tracked(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """InstanceNorm with running statistics, computed as torch's ``instance_norm`` does.

    The (N, C, *) input is seen as one sample of N x C channels and batch-normalized; each
    channel's running statistics are updated N times in parallel (once per sample's copy)
    and averaged back over the samples.
    """
    n, c = x.shape[:2]
    repeat = (lambda v: None if v is None else v.repeat(n)) if n else (lambda v: v)
    rm, rv = repeat(running_mean), repeat(running_var)
    flat = x.reshape(1, n * c, *x.shape[2:])
    out = F.batch_norm(flat, rm, rv, repeat(weight), repeat(bias), use_input_stats, momentum, eps)
    if use_input_stats and n:
        with torch.no_grad():
            running_mean.copy_(rm.view(n, c).mean(0))
            running_var.copy_(rv.view(n, c).mean(0))
    return out.view_as(x)


def make_norm2d(kind: str, channels: int, groups: int = 4) -> nn.Module:
    """A norm layer for (N, C, H, W) activations by name, all with per-channel gamma, beta.

    kind: "batch" (bnlab BatchNorm2d), "layer" (GroupNorm with 1 group: LayerNorm over
    C, H, W with per-channel affine, as in Wu & He 2018), "instance" (affine), "group"
    (``groups`` groups, or fewer when ``channels`` is not divisible), or "none" (Identity).
    """
    if kind == "batch":
        return modules.BatchNorm2d(channels)
    if kind == "layer":
        return GroupNorm(1, channels)
    if kind == "instance":
        return InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return GroupNorm(math.gcd(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"kind must be one of {[*KINDS, 'none']} (got {kind!r})")


# ----------------------------------------------------------------------------- the picture


@torch.no_grad()
def shared_statistics(
    fn: Callable[[Tensor], Tensor], shape: Sequence[int], index: Sequence[int], seed: int = 0
) -> Tensor:
    """Which elements share their statistics with ``x[index]`` under the norm ``fn``.

    Measured, not declared: perturbing ``x[index]`` changes the output exactly at the
    elements whose mean and variance include it. Runs ``fn`` on random float64 input of
    ``shape`` with and without the perturbation; returns a bool mask of ``shape``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    bumped = x.clone()
    bumped[tuple(index)] += 1.0
    return fn(bumped) != fn(x)


def zca_whiten(x: Tensor, eps: float = 1e-5) -> Tensor:
    """ZCA whitening of (N, D) features: zero mean and covariance close to the identity.

    Subtracts the batch mean and multiplies by Sigma^(-1/2) = U diag((lambda + eps)^(-1/2)) U^T
    from the eigendecomposition of the biased covariance Sigma = U diag(lambda) U^T. Unlike
    BN it mixes features: it needs the D x D covariance (O(N D^2)) and an eigendecomposition
    (O(D^3)) per batch, and Sigma is singular when N <= D. Differentiable through
    ``torch.linalg.eigh`` as long as the eigenvalues are distinct.
    """
    if x.dim() != 2:
        raise ValueError(f"zca_whiten expects (N, D) features (got shape {tuple(x.shape)})")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (got {eps})")
    centered = x - x.mean(dim=0)
    cov = centered.T @ centered / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    inverse_root = eigenvectors @ torch.diag((eigenvalues + eps).rsqrt()) @ eigenvectors.T
    return centered @ inverse_root
