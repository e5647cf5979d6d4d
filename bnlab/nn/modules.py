"""BatchNorm1d/2d/3d from scratch: drop-ins for ``torch.nn.BatchNorm1d/2d/3d``.

Same arguments and defaults (with torch 2.14's keyword-only ``bias``), same parameters
and buffers, same state_dict keys, so a state_dict loads both ways. The mode logic
mirrors ``torch.nn.modules.batchnorm``:

- training and tracking: count the batch, normalize with batch statistics, update
  the running ones (momentum, or 1/num_batches_tracked when momentum is None);
- eval and tracking: normalize with the running statistics;
- not tracking (``track_running_stats=False``): batch statistics in both modes.

Serves notebook 03.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.nn import functional as F


def check_input_dim(module: nn.Module, x: Tensor, layouts: str) -> None:
    """Refuse an input of the wrong rank or channel count for a BN-like module, naming both.

    ``module.expected_dims`` lists the ranks it takes (empty: any rank from 2 up);
    ``layouts`` tells the reader which class takes which shape. Shared by the BatchNorm,
    Batch Renorm and SyncBatchNorm modules.
    """
    name, dims = type(module).__name__, module.expected_dims
    if (x.dim() not in dims) if dims else x.dim() < 2:
        want = " or ".join(f"{d}D" for d in dims) if dims else "at least 2D"
        raise ValueError(
            f"{name} expected {want} input (got {x.dim()}D input of shape {tuple(x.shape)}); "
            f"{layouts}"
        )
    if x.shape[1] != module.num_features:
        raise F.ShapeError(  # a RuntimeError too, as torch's "running_mean should contain ..."
            f"{name}({module.num_features}) expected {module.num_features} channels in "
            f"dimension 1, got {x.shape[1]} in input of shape {tuple(x.shape)}; "
            f"build it as {name}({x.shape[1]}) or check the layer before it"
        )


class _BatchNorm(nn.Module):
    """Parameters, buffers and the train/eval logic; subclasses only check the rank."""

    _version = 2  # torch's: state_dicts of version >= 2 carry num_batches_tracked
    expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int (got {num_features!r})")
        F.validate_eps(eps)
        F.validate_momentum(momentum)
        if dtype is not None and not torch.empty((), dtype=dtype).is_floating_point():
            raise TypeError(f"dtype must be a floating-point dtype (got {dtype})")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:  # torch >= 2.14: BatchNorm(..., bias=False) scales without shifting
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        check_input_dim(
            self, x, "BatchNorm1d takes (N, C) or (N, C, L), BatchNorm2d (N, C, H, W), "
            "BatchNorm3d (N, C, D, H, W)",
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        # Validate before num_batches_tracked is incremented, so a rejected input leaves
        # the module as it was; _normalize then computes without checking again.
        self._check_input_dim(x)
        F.validate_momentum(self.momentum)  # attributes can be changed after construction
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        F.validate_batch_norm_args(  # every argument, before any buffer changes
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            use_batch_stats,
            self.eps,
            self.bias,
        )
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = F.averaging_factor(self.momentum, self.num_batches_tracked)
        # Batch statistics when training, or when there are no running ones to use (above).
        # Running buffers are passed when they are to be used (eval) or updated (train+track).
        pass_buffers = not self.training or self.track_running_stats
        return self._normalize(
            x,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            use_batch_stats,
            factor,
        )

    def _normalize(self, x, running_mean, running_var, training: bool, momentum: float) -> Tensor:
        """The one functional call; kernel-backed subclasses override only this."""
        return F.batch_norm_validated(
            x, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # Old torch checkpoints (version < 2) have no num_batches_tracked. As torch does, the
        # module keeps its own counter (0 only when it has none, or it is on the meta device).
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            own = self.num_batches_tracked
            keep = own is not None and own.device != torch.device("meta")
            state_dict[key] = own if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """BN over (N, C) or (N, C, L) input: statistics per feature / per channel."""

    expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """BN over (N, C, H, W) input: statistics per channel, over N, H and W."""

    expected_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """BN over (N, C, D, H, W) input: statistics per channel, over N, D, H and W."""

    expected_dims = (5,)


#: Every BatchNorm layer bnlab recognises: torch.nn's and bnlab's own, of any rank.
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, _BatchNorm)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (torch.nn's or bnlab's, any rank)."""
    return isinstance(module, BATCH_NORMS)
