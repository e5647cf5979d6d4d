"""SyncBatchNorm: BN whose batch statistics span every rank of a process group.

With data parallelism each process sees N / world_size examples; plain BN would normalize
with statistics of that slice only. SyncBatchNorm normalizes every slice with the statistics
of the whole batch, so the result is BN over the concatenated batch, exactly:

- forward (training): each rank summarizes its slice per channel as (count, mean, M2);
  ONE ``all_gather`` of the packed ``[count, mean..., M2...]`` vector brings every summary
  to every rank, which merges them with Chan's formula (:func:`bnlab.nn.merge.merge_moments`,
  the one definition bnlab shares) in rank order. Uneven slices and a rank with N = 0 are
  exact (no E[x^2] - E[x]^2 cancellation), and every rank computes the same global mean and
  variance, so the running statistics (unbiased: M2 / (count - 1)) stay identical;
- backward: ONE ``all_reduce`` of the per-channel sums of dy and dy * x_hat; with them the
  input gradient is BN's over the global batch,
  ``dx = gamma * invstd * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)``. The parameter
  gradients are the local sums: summed over ranks they equal single-process BN's (DDP
  averages them);
- eval mode, no initialized process group, or a group of one: plain BN, no communication.

Before the statistics, the ranks exchange a small header (input rank, channels, dtype,
num_features, whether the local input was rejected) with one small ``all_gather``: ranks
that disagree, or a rank whose input is invalid, make *every* rank raise a ValueError naming
the argument, instead of leaving the others waiting in a collective. (A rank that never
calls forward or backward still leaves the others waiting: bound it with
``init_process_group(timeout=...)``, as :mod:`bnlab.distributed.launch` does.)

torch's own ``torch.nn.SyncBatchNorm`` has no CPU path: in training mode with an initialized
process group, a CPU input raises ``ValueError: SyncBatchNorm expected input tensor to be on
GPU or XPU or privateuseone`` (torch 2.14.1, checked in a spawned gloo group by
``tests/distributed/test_sync.py``). This one runs wherever the backend does.

Serves notebook 09.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnlab.nn import functional as F
from bnlab.nn.hooks import replace_modules
from bnlab.nn.merge import merge_moments
from bnlab.nn.modules import _BatchNorm, check_input_dim, is_batchnorm

#: dtypes by the code the header carries (-1: anything else, e.g. an integer input)
DTYPE_CODES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HEADER = ("ndim", "channels", "dtype", "num_features", "rejected")


def sync_group(process_group=None):
    """The group to synchronize over, or None when there is nothing to synchronize with.

    None when torch.distributed is unavailable or not initialized, or the group has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _gather(t: Tensor, group) -> Tensor:
    """all_gather ``t`` (same shape on every rank) into a (world_size, *t.shape) tensor."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def _describe(column: str, value: int) -> str:
    if column == "dtype":
        return str(DTYPE_CODES[value]) if 0 <= value < len(DTYPE_CODES) else "a non-float dtype"
    if column == "ndim":
        return f"{value}D"
    return str(value) if value >= 0 else "none"


def agree_on_input(x: Tensor, num_features: int, problem: str | None, group) -> None:
    """Exchange a header with every rank; raise the same ValueError on every rank if wrong.

    ``problem`` is this rank's own complaint about its input (None if it has none). Raises
    when the ranks disagree on num_features, input rank, input channels or dtype, or when
    any rank rejected its input; every rank sees every header, so all raise together.
    """
    channels = x.shape[1] if x.dim() >= 2 else -1
    code = DTYPE_CODES.index(x.dtype) if x.dtype in DTYPE_CODES else -1
    header = torch.tensor(
        [x.dim(), channels, code, num_features, problem is not None],
        dtype=torch.long,
        device=x.device,
    )
    rows = _gather(header, group).tolist()
    names = {
        "num_features": "num_features (the layer's size)",
        "ndim": "the input's rank (input.dim())",
        "channels": "the input's channels (input.shape[1])",
        "dtype": "the input's dtype",
    }
    disagreements = []
    for column, name in names.items():
        values = [row[_HEADER.index(column)] for row in rows]
        if len(set(values)) > 1:
            each = ", ".join(f"rank {r}: {_describe(column, v)}" for r, v in enumerate(values))
            disagreements.append(f"{name} ({each})")
    if disagreements:
        raise ValueError(
            "SyncBatchNorm: the ranks disagree on " + "; ".join(disagreements) + ". Every rank "
            "must run the same model on inputs of the same rank, channels and dtype; only the "
            "batch size N may differ"
        )
    if any(row[_HEADER.index("rejected")] for row in rows):
        messages = [None] * len(rows)
        dist.all_gather_object(messages, problem, group=group)  # only on this error path
        each = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise ValueError(f"SyncBatchNorm rejected the input of a rank: {each}")


def local_moments(xs: Tensor) -> tuple[int, Tensor, Tensor]:
    """(count, mean, M2) per channel of this rank's slice; an empty slice gives (0, 0, 0)."""
    count = xs.numel() // xs.shape[1]
    if count == 0:
        zeros = torch.zeros(xs.shape[1], dtype=xs.dtype, device=xs.device)
        return 0, zeros, zeros.clone()
    dims = F.reduce_dims(xs)
    mean = xs.mean(dim=dims)
    m2 = (xs - F.per_channel(mean, xs)).square().sum(dim=dims)
    return count, mean, m2


def global_moments(xs: Tensor, group) -> tuple[int, Tensor, Tensor]:
    """(count, mean, M2) per channel of the batch of every rank: ONE all_gather, Chan's merge.

    Merged in float64 (where the device has it), in rank order, so every rank gets
    bit-identical results.
    """
    count, mean, m2 = local_moments(xs)
    wide = torch.float64 if xs.device.type in ("cpu", "cuda") else xs.dtype
    c = xs.shape[1]
    packed = torch.cat(
        [torch.tensor([count], dtype=wide, device=xs.device), mean.to(wide), m2.to(wide)]
    )
    table = _gather(packed, group)  # (world_size, 1 + 2C)
    counts = [int(n) for n in table[:, 0].tolist()]
    n, m, q = 0, torch.zeros_like(packed[1 : c + 1]), torch.zeros_like(packed[1 : c + 1])
    for r, nr in enumerate(counts):
        n, m, q = merge_moments(n, m, q, nr, table[r, 1 : c + 1], table[r, c + 1 :])
    return n, m, q


class SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with the global statistics; backward with ONE all_reduce of two sums.

    Forward: BN's own (:class:`bnlab.nn.functional.BatchNormFunction`'s) with the given
    global mean and invstd. Backward: the compact formula with the means of dy and
    dy * x_hat taken over the global batch of ``count`` values per channel. Every rank must
    run the backward (with the same ``requires_grad`` on its input), or the others wait.
    """

    @staticmethod
    def forward(x, weight, bias, mean, invstd, count, eps, group):
        return F.BatchNormFunction.forward(x, weight, bias, mean, invstd, True, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, mean, invstd, count, eps, group = inputs
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.count, ctx.group = count, group

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        xhat = (x - F.per_channel(mean, x)) * F.per_channel(invstd, x)
        dims = F.reduce_dims(xhat)
        dy = dout.to(xhat.dtype)
        sum_dy = dy.sum(dim=dims)
        sum_dy_xhat = (dy * xhat).sum(dim=dims)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)  # the one collective of the backward
            mean_dy, mean_dy_xhat = (sums / ctx.count).chunk(2)
            scale = F.per_channel(invstd, xhat)
            if weight is not None:
                scale = scale * F.per_channel(weight, xhat)
            dx = scale * (
                dy - F.per_channel(mean_dy, xhat) - xhat * F.per_channel(mean_dy_xhat, xhat)
            )
            dx = dx.to(dout.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group,
) -> Tensor:
    """Training-mode BN of ``x`` with the statistics of every rank's batch in ``group``.

    ``momentum`` is the factor applied to the running statistics (already 1/num_batches for
    a cumulative average). The arguments must have passed :func:`agree_on_input`.
    """
    xs = F.accumulation_view(x)
    with torch.no_grad():  # the backward accounts for the statistics' dependence on x
        n, mean, m2 = global_moments(xs, group)
    if n == 0:  # every rank empty: as plain BN, an empty output and untouched statistics
        return F.batch_norm_validated(x, running_mean, running_var, weight, bias, True, 0.0, eps)
    if n == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel "
            f"over all {dist.get_world_size(group)} ranks together (input size "
            f"{tuple(x.shape)} on this rank); give the ranks a larger batch"
        )
    var = m2 / n  # biased: this normalizes
    if running_mean is not None:
        F.update_running_stats(running_mean, running_var, mean, var, n, momentum)
    invstd = torch.rsqrt(var + eps).to(xs.dtype)
    out = SyncBatchNormFunction.apply(xs, weight, bias, mean.to(xs.dtype), invstd, n, eps, group)
    return out.to(x.dtype)


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm``: BN over the batch of every rank of a group.

    Same constructor, parameters, buffers and state_dict keys as torch's (weight, bias,
    running_mean, running_var, num_batches_tracked); any input of rank >= 2, (N, C, *).
    Training with a process group of two or more ranks synchronizes (one small header
    all_gather, one statistics all_gather forward, one all_reduce backward); otherwise it is
    plain BN (:class:`bnlab.nn.modules.BatchNorm1d` and friends), with no communication.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    expected_dims = ()  # any rank from 2 up, as torch's SyncBatchNorm

    def _check_input_dim(self, x: Tensor) -> None:
        check_input_dim(self, x, "SyncBatchNorm takes (N, C, *)")

    def _local_problem(self, x: Tensor) -> str | None:
        """What this rank's own checks reject about ``x`` (batch size aside), or None."""
        try:
            self._check_input_dim(x)
            F.validate_floating(x)
            F.validate_eps(self.eps)
            F.validate_momentum(self.momentum)
            for name in ("running_mean", "running_var", "weight", "bias"):
                F.validate_vector(getattr(self, name), name, x)
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    def forward(self, x: Tensor) -> Tensor:
        group = sync_group(self.process_group) if self.training else None
        if group is None:  # eval, no group, or a group of one: plain BN, like torch's
            return super().forward(x)
        agree_on_input(x, self.num_features, self._local_problem(x), group)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = F.averaging_factor(self.momentum, self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None,) * 2
        return sync_batch_norm(x, *running, self.weight, self.bias, factor, self.eps, group)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", process_group={self.process_group}" if self.process_group is not None else ""
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm layer in ``module`` (torch.nn's or bnlab's) by this class.

        As torch's: the new layers share the old ones' parameters and buffers (same tensors,
        so values, devices, dtypes and ``requires_grad`` carry over) and keep their training
        flag. Returns ``module`` itself (changed in place) unless it is a BatchNorm layer.
        """

        def convert(bn: nn.Module) -> nn.Module:
            sync = cls(
                bn.num_features,
                bn.eps,
                bn.momentum,
                bn.affine,
                bn.track_running_stats,
                process_group,
                bias=getattr(bn, "bias", None) is not None or not bn.affine,
            )
            if bn.affine:
                sync.weight, sync.bias = bn.weight, bn.bias
            sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
            sync.num_batches_tracked = bn.num_batches_tracked
            sync.train(bn.training)
            if hasattr(bn, "qconfig"):
                sync.qconfig = bn.qconfig
            return sync

        if is_batchnorm(module):
            return convert(module)
        return replace_modules(module, is_batchnorm, convert)
