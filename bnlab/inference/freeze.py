"""Freeze BatchNorm layers for fine-tuning, so that they really stay frozen.

Two common attempts fail (PyTorch docs, ``torch.nn.BatchNorm2d`` and ``nn.Module.train``):

- ``p.requires_grad = False`` on gamma and beta stops their gradient, but in training
  mode the layer still normalizes with batch statistics and still updates
  ``running_mean`` / ``running_var``;
- ``bn.eval()`` is undone by the next ``model.train()``, which sets every submodule's
  ``training`` flag recursively.

``freeze_bn`` does both halves: gamma and beta stop learning, and a forward pre-hook
puts the layer back in eval mode before each call, so ``model.train()`` cannot undo it.
``to_frozen_batchnorm2d`` is the other road, torchvision's: replace each BatchNorm2d by
``torchvision.ops.FrozenBatchNorm2d``, whose statistics and affine map are buffers.

Serves notebook 06.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn import hooks, modules
from bnlab.nn.hooks import batchnorm_layers, replace_modules

_HOOK_ATTR = "_bnlab_freeze_hook"  # the hook handle, kept on the layer it belongs to


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    # Runs before every forward: undo whatever model.train() did to this layer.
    module.training = False


def is_frozen(module: nn.Module) -> bool:
    """Whether ``freeze_bn`` has frozen this BatchNorm layer (and it was not unfrozen)."""
    return getattr(module, _HOOK_ATTR, None) is not None


def freeze_bn(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer of ``model`` in place; returns ``model``.

    stats: normalize with the running statistics and never update them, even after
        ``model.train()`` (the layer is put in eval mode before each forward).
    affine: stop gamma and beta from learning (``requires_grad=False``).
    Raises ValueError when the model has no BatchNorm layer (nothing would be frozen).
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            "freeze_bn found no BatchNorm layer in the model; nothing to freeze "
            "(bnlab recognises torch.nn.BatchNorm1d/2d/3d and bnlab.modules.BatchNorm*)"
        )
    for _name, bn in layers:
        if stats and not is_frozen(bn):
            if not bn.track_running_stats or bn.running_mean is None:
                raise ValueError(
                    "freeze_bn(stats=True) needs running statistics, but a layer was built "
                    "with track_running_stats=False; estimate them first (build it with "
                    "track_running_stats=True and run bnlab.recalibrate.recalibrate_bn) or "
                    "pass stats=False"
                )
            bn.eval()
            setattr(bn, _HOOK_ATTR, hooks.attach(bn, _stay_in_eval))
        if affine:
            for p in bn.parameters(recurse=False):
                p.requires_grad_(False)
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo ``freeze_bn``: gamma and beta learn again and the layers follow ``model.train()``.

    Each layer's mode is set to the model's current mode. Returns ``model``.
    """
    for _name, bn in batchnorm_layers(model):
        handle = getattr(bn, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            setattr(bn, _HOOK_ATTR, None)
        for p in bn.parameters(recurse=False):
            p.requires_grad_(True)
        bn.train(model.training)
    return model


def _frozen_copy(bn: nn.Module) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    if bn.running_mean is None:
        raise ValueError(
            "cannot convert a BatchNorm2d built with track_running_stats=False: it has no "
            "running statistics to freeze"
        )
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.running_mean.dtype)
    with torch.no_grad():
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight)
        if bn.bias is not None:
            frozen.bias.copy_(bn.bias)
    # torchvision builds float32 buffers; keep the layer's device and dtype
    return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)


def to_frozen_batchnorm2d(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (torch's or bnlab's) by torchvision's FrozenBatchNorm2d.

    The frozen layer computes ``x * gamma / sqrt(running_var + eps) + (beta - ...)`` from
    buffers only, so no optimizer can change it and ``train()`` has no effect on it.
    Returns ``model`` (changed in place).
    """
    bn2d = (nn.BatchNorm2d, modules.BatchNorm2d)
    return replace_modules(model, lambda m: isinstance(m, bn2d), _frozen_copy)
