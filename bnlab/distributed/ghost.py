"""Ghost Batch Normalization: one batch normalized as several smaller, virtual batches.

Hoffer, Hubara & Soudry (2017), "Train longer, generalize better: closing the generalization
gap in large batch training of neural networks" (NeurIPS 2017, arXiv:1705.08741), Sec. 4:
with a large batch, normalize each *virtual* ("ghost") sub-batch of ``virtual_batch_size``
examples with its own mean and variance, so that BN keeps the noise of small batches.

:class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d` are ``torch.nn.BatchNorm1d/2d`` (the
same parameters, buffers and state_dict keys) whose training forward splits the batch along
N into chunks of ``virtual_batch_size`` (the last one may be smaller) and runs torch's BN on
each chunk in turn. So in training it *is* BN applied per chunk: each chunk updates the
running statistics once, in order (as Hoffer et al.'s own code does), and a cumulative
average (``momentum=None``) counts chunks. ``virtual_batch_size >= N`` is plain BN. In eval
mode it is plain BN with the running statistics.

Why it lives in ``distributed``: data-parallel training with plain (per-replica) BN is ghost
BN with the replica's batch as the virtual batch; the same statistics appear in gradient
accumulation over micro-batches (:mod:`bnlab.distributed.ddp`). Notebook 09 measures all three.
:func:`convert_ghost_batchnorm` swaps every BN of a model for ghost BN, sharing its tensors.

Serves notebook 09.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.nn.hooks import replace_modules
from bnlab.nn.modules import is_batchnorm


def _validate_virtual_batch_size(virtual_batch_size: int) -> int:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError(f"virtual_batch_size must be an int (got {virtual_batch_size!r})")
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1 (got {virtual_batch_size})")
    return virtual_batch_size


class _GhostMixin:
    """The chunked training forward shared by the 1d and 2d classes."""

    virtual_batch_size: int

    def forward(self, x: Tensor) -> Tensor:
        base = super().forward  # torch's BatchNorm forward
        if not self.training or x.dim() < 2 or x.shape[0] <= self.virtual_batch_size:
            return base(x)
        return torch.cat([base(chunk) for chunk in x.split(self.virtual_batch_size)])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """BatchNorm1d over virtual batches of ``virtual_batch_size`` in training; (N, C[, L])."""

    def __init__(self, num_features: int, virtual_batch_size: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = _validate_virtual_batch_size(virtual_batch_size)


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """BatchNorm2d over virtual batches of ``virtual_batch_size`` in training, (N, C, H, W)."""

    def __init__(self, num_features: int, virtual_batch_size: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = _validate_virtual_batch_size(virtual_batch_size)


def _ghost_class(bn: nn.Module) -> type[nn.Module]:
    name = type(bn).__name__
    if name.endswith("1d"):
        return GhostBatchNorm1d
    if name.endswith("2d"):
        return GhostBatchNorm2d
    raise ValueError(f"ghost BN comes as 1d and 2d only (got {name})")


def convert_ghost_batchnorm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` (torch.nn's or bnlab's) by ghost BN, in place.

    Like ``convert_sync_batchnorm``: the new layers share the old ones' parameters and buffers
    (the same tensors) and keep their training flag. Returns ``module`` (or the new layer if
    ``module`` itself is a BatchNorm).
    """
    _validate_virtual_batch_size(virtual_batch_size)

    def convert(bn: nn.Module) -> nn.Module:
        ghost = _ghost_class(bn)(
            bn.num_features,
            virtual_batch_size,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
        )
        if bn.affine:
            ghost.weight, ghost.bias = bn.weight, bn.bias
        ghost.running_mean, ghost.running_var = bn.running_mean, bn.running_var
        ghost.num_batches_tracked = bn.num_batches_tracked
        return ghost.train(bn.training)

    if is_batchnorm(module):
        return convert(module)
    return replace_modules(module, is_batchnorm, convert)
