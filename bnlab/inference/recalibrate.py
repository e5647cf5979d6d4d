"""Re-estimate BatchNorm running statistics from data: precise BN.

Running statistics go stale when the weights change without them (weight averaging,
pruning, a weight port) or when the input distribution shifts. The remedy is to pass
data through the network and recompute them. ``torch.optim.swa_utils.update_bn`` does
it by resetting the buffers and running the layers with ``momentum=None`` (an equal-
weight average of the per-batch mean and unbiased variance). ``recalibrate_bn`` follows
"precise BN" (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, arXiv:2105.07576):
the running statistics become the population statistics of every value each layer saw
over many batches, weighted by batch size, combined exactly (Chan et al.'s pairwise
update of mean and sum of squares, :mod:`bnlab.nn.merge`) so nothing depends on the batch
order.

Stored as PyTorch does: ``running_mean`` the mean, ``running_var`` the *unbiased*
variance of all M values per channel, ``M2 / (M - 1)``.

Serves notebook 06.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bnlab.inference.freeze import is_frozen
from bnlab.nn import hooks
from bnlab.nn.functional import batch_stats
from bnlab.nn.hooks import batchnorm_layers
from bnlab.nn.merge import merge_moments


class _Accumulator:
    """Per-channel count, mean and sum of squared deviations (M2), merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        mean, var = batch_stats(x.detach())  # (C,), (C,) biased: the batch's own moments
        n = x.numel() // x.shape[1]
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, n, mean, m2)


def _first_tensor(batch) -> Tensor:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            "recalibrate_bn expects data to yield tensors or (x, ...) tuples whose first "
            f"element is the input tensor (got {type(batch).__name__})"
        )
    return batch


def _run(model: nn.Module, data: Iterable, num_batches: int | None, device) -> int:
    """Forward the first ``num_batches`` batches of ``data`` (all if None); how many ran."""
    used = 0
    for batch in data:
        if num_batches is not None and used >= num_batches:
            break
        x = _first_tensor(batch)
        model(x if device is None else x.to(device))
        used += 1
    return used


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    train_others: bool = False,
    device=None,
) -> int:
    """Replace every BatchNorm layer's running statistics by precise population statistics.

    model: any module holding BatchNorm layers (torch.nn's or bnlab's).
    data: iterable of x (N, ...) or (x, y, ...) batches, e.g. a DataLoader or TensorLoader;
        labels are ignored. The statistics pool all of its values.
    num_batches: use only the first ``num_batches`` batches (None: all of them).
    train_others: False (default) runs Dropout and every other non-BN module in eval
        mode, so the statistics describe the inputs BN sees at inference (this also
        removes the Dropout variance shift, Li et al. 2019, arXiv:1801.05134); True runs
        the whole model in train mode, as ``torch.optim.swa_utils.update_bn`` does.
    Layers frozen with ``bnlab.freeze.freeze_bn`` and layers without running statistics
    are left alone. BN layers normalize with batch statistics during the pass, as in
    training. The model's modes are restored afterwards. Returns the number of batches used.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None (got {num_batches})")
    targets = [
        (name, bn)
        for name, bn in batchnorm_layers(model)
        if bn.running_mean is not None and not is_frozen(bn)
    ]
    if not targets:
        raise ValueError(
            "recalibrate_bn found no BatchNorm layer with running statistics to estimate "
            "(layers built with track_running_stats=False or frozen by freeze_bn are skipped)"
        )
    accumulators = {bn: _Accumulator() for _name, bn in targets}
    with (
        hooks.preserved(model),
        hooks.hooked(accumulators, lambda m, args: accumulators[m].add(args[0])),
    ):
        model.train(train_others)
        for _name, bn in targets:
            bn.train()
        used = _run(model, data, num_batches, device)
    if used == 0:
        raise ValueError("recalibrate_bn got no batches: data is empty")
    for name, bn in targets:
        acc = accumulators[bn]
        if acc.count < 2:
            raise ValueError(
                f"BatchNorm layer {name!r} saw a single value per channel; pass more data"
            )
        bn.running_mean.copy_(acc.mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((acc.m2 / (acc.count - 1)).to(bn.running_var.dtype))
    return used


def stats_error(model: nn.Module, reference: nn.Module) -> float:
    """Largest relative difference between two models' running statistics.

    max over BN layers and channels of |a - b| / (|b| + 1e-3), for running_mean and
    running_var; ``reference`` supplies b. Both models must have the same BN layers.
    """
    mine, ref = batchnorm_layers(model), batchnorm_layers(reference)
    if [n for n, _ in mine] != [n for n, _ in ref]:
        raise ValueError("model and reference must have the same BatchNorm layers (by name)")
    worst = 0.0
    for (_n, a), (_m, b) in zip(mine, ref, strict=True):
        for key in ("running_mean", "running_var"):
            ta, tb = getattr(a, key), getattr(b, key)
            worst = max(worst, ((ta - tb).abs() / (tb.abs() + 1e-3)).max().item())
    return worst
