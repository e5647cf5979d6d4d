"""Batch Renormalization: BN whose training output does not depend on the mini-batch alone.

Ioffe, 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models" (arXiv:1702.03275). BN normalizes with the batch's statistics while
training and the running ones at test time, so small or non-i.i.d. batches train a network
that sees different activations at test time. Batch Renorm corrects the batch normalization
towards the running one, per channel:

    mu_B, sigma_B = batch mean, sqrt(biased batch variance + eps)
    mu, sigma     = running_mean, sqrt(running_var + eps)
    r = clamp(sigma_B / sigma, 1 / r_max, r_max)        (a constant for the backward)
    d = clamp((mu_B - mu) / sigma, -d_max, d_max)       (a constant for the backward)
    x_hat = (x - mu_B) / sigma_B * r + d
    y = gamma * x_hat + beta

When the clamps do not bind, ``x_hat = (x - mu) / sigma``: the inference-time normalization,
while gradients still flow through the batch statistics. With ``r_max = 1`` and ``d_max = 0``
it is BN exactly; the paper starts there and relaxes ``r_max``, ``d_max`` (plain attributes a
schedule may change between steps). Running statistics use PyTorch's momentum convention
(the new batch weighed by ``momentum``, the unbiased variance); eval mode is BN with them.

Serves notebook 06.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from bnlab.nn import functional as F
from bnlab.nn.hooks import layers
from bnlab.nn.modules import check_input_dim


def _validate_at_least(name: str, value: float, minimum: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum} (got {name}={value!r})")


def validate_renorm_args(eps: float, momentum: float, r_max: float, d_max: float) -> None:
    """Raise a ValueError naming the argument unless eps > 0, 0 <= momentum <= 1,
    r_max >= 1 and d_max >= 0 (Batch Renorm needs a fixed momentum: None is refused)."""
    F.validate_eps(eps)
    if momentum is None or not isinstance(momentum, numbers.Real):
        raise ValueError(f"momentum must be a number in [0, 1] (got momentum={momentum!r})")
    F.validate_momentum(momentum)
    _validate_at_least("r_max", r_max, 1.0)
    _validate_at_least("d_max", d_max, 0.0)


class _BatchRenorm(nn.Module):
    """Parameters, buffers and the forward; subclasses only say which ranks they take."""

    expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int (got {num_features!r})")
        validate_renorm_args(eps, momentum, r_max, d_max)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.r_max, self.d_max, self.affine = r_max, d_max, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        check_input_dim(
            self, x, "BatchRenorm1d takes (N, C) or (N, C, L), BatchRenorm2d (N, C, H, W)"
        )
        F.validate_floating(x)
        if self.training and x.numel() == 0:
            raise ValueError(
                f"{name} cannot train on an empty batch (input shape {tuple(x.shape)})"
            )
        if self.training:
            F.validate_batch_size(x)

    def forward(self, x: Tensor) -> Tensor:
        # Every check first, so a rejected call leaves the buffers as they were.
        self._check_input(x)
        validate_renorm_args(self.eps, self.momentum, self.r_max, self.d_max)
        if not self.training:
            stats = (self.running_mean, self.running_var)
            return F.batch_norm_validated(x, *stats, self.weight, self.bias, False, 0.0, self.eps)
        return self._renormalize(x).to(x.dtype)

    def _renormalize(self, x: Tensor) -> Tensor:
        """The training forward, then the running-statistics update."""
        xs = F.accumulation_view(x)  # float32 for half-precision input, as BN does
        dims = F.reduce_dims(xs)
        mean_b = xs.mean(dim=dims)
        var_b = (xs - F.per_channel(mean_b, xs)).square().mean(dim=dims)
        std_b = torch.sqrt(var_b + self.eps)
        with torch.no_grad():
            mean, std = self.running_mean.to(xs.dtype), torch.sqrt(self.running_var + self.eps)
            r = (std_b / std.to(xs.dtype)).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean_b - mean) / std.to(xs.dtype)).clamp(-self.d_max, self.d_max)
        x_hat = (xs - F.per_channel(mean_b, xs)) / F.per_channel(std_b, xs)
        x_hat = x_hat * F.per_channel(r, xs) + F.per_channel(d, xs)
        if self.affine:
            x_hat = x_hat * F.per_channel(self.weight, xs) + F.per_channel(self.bias, xs)
        self.num_batches_tracked.add_(1)
        count = xs.numel() // xs.shape[1]
        batch = (mean_b.detach(), var_b.detach())
        F.update_running_stats(self.running_mean, self.running_var, *batch, count, self.momentum)
        return x_hat

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"r_max={self.r_max}, d_max={self.d_max}, affine={self.affine}"
        )


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over (N, C) or (N, C, L) input: statistics per feature / per channel."""

    expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over (N, C, H, W) input: statistics per channel, over N, H and W."""

    expected_dims = (4,)


def set_limits(model: nn.Module, r_max: float, d_max: float) -> int:
    """Set ``r_max`` and ``d_max`` of every Batch Renorm layer in ``model``; how many there are.

    The paper's schedule starts at r_max = 1, d_max = 0 (plain BN, while the running
    statistics warm up) and relaxes them later; call this between epochs to follow it.
    """
    validate_renorm_args(1e-5, 0.01, r_max, d_max)
    found = layers(model, _BatchRenorm)
    for _, layer in found:
        layer.r_max, layer.d_max = r_max, d_max
    return len(found)
