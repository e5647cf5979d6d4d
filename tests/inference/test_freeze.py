"""Tests for bnlab.inference.freeze: freeze_bn, unfreeze_bn, FrozenBatchNorm2d, replace_modules."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import BN_KINDS, bn_lenet, images, warm_up
from torch import nn

from bnlab.experiments.models import lenet
from bnlab.inference.freeze import (
    batchnorm_layers,
    freeze_bn,
    is_frozen,
    replace_modules,
    to_frozen_batchnorm2d,
    unfreeze_bn,
)
from bnlab.nn.modules import is_batchnorm

# ------------------------------------------------------------------------------ freeze


@pytest.mark.parametrize("bn", BN_KINDS)
def test_requires_grad_false_alone_does_not_freeze_stats(bn):
    model = bn_lenet(bn)
    for _n, layer in batchnorm_layers(model):
        for p in layer.parameters():
            p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    model.train()
    model(images())
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


@pytest.mark.parametrize("bn", BN_KINDS)
def test_freeze_bn_survives_train_and_an_optimizer_step(bn):
    model = bn_lenet(bn)
    warm_up(model)
    freeze_bn(model)
    model.train()  # would undo a plain bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = images(), torch.arange(64) % 10
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for name, layer in batchnorm_layers(model):
        assert is_frozen(layer) and not layer.weight.requires_grad
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[f"{name}.{key}"], after[f"{name}.{key}"]), (name, key)
    assert not torch.equal(before["0.weight"], after["0.weight"])  # the rest still learns
    # Frozen in train mode == plain eval mode: predictions do not depend on the batch.
    model.train()
    one = model(x[:1])
    assert torch.allclose(one, model(x)[:1], atol=1e-5)


def test_freeze_stats_only_and_unfreeze():
    model = bn_lenet()
    freeze_bn(model, stats=True, affine=False)
    assert all(p.requires_grad for _n, b in batchnorm_layers(model) for p in b.parameters())
    unfreeze_bn(model.train())
    layer = model[1]
    assert not is_frozen(layer) and layer.training
    before = layer.running_mean.clone()
    model(images())
    assert not torch.equal(before, layer.running_mean)  # updates again
    freeze_bn(model)
    unfreeze_bn(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_errors_name_the_problem():
    with pytest.raises(ValueError, match="no BatchNorm"):
        freeze_bn(lenet(bn=None))
    net = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze_bn(net)


@pytest.mark.parametrize("bn", BN_KINDS)
def test_frozen_batchnorm2d_matches_eval_and_has_no_parameters(bn):
    from torchvision.ops import FrozenBatchNorm2d

    model = bn_lenet(bn)
    warm_up(model)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).eval()
    frozen = to_frozen_batchnorm2d(copy.deepcopy(model)).train()
    assert isinstance(frozen[1], FrozenBatchNorm2d) and isinstance(frozen[5], FrozenBatchNorm2d)
    assert is_batchnorm(frozen[10])  # BatchNorm1d stays as it is
    for i in (10, 13):
        frozen[i].eval()
    x = images()
    torch.testing.assert_close(frozen(x), reference(x), atol=1e-5, rtol=1e-5)
    names = [n for n, _ in frozen.named_parameters()]
    assert "1.weight" not in names and "1.running_mean" in dict(frozen.named_buffers())


def test_replace_modules_swaps_bn_for_groupnorm():
    model = replace_modules(
        bn_lenet(),
        lambda m: isinstance(m, nn.BatchNorm2d),
        lambda bn: nn.GroupNorm(2, bn.num_features),
    )
    assert isinstance(model[1], nn.GroupNorm) and isinstance(model[10], nn.BatchNorm1d)
    assert model(images(4)).shape == (4, 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frozen_batchnorm_keeps_the_dtype(dtype):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).to(dtype).eval()
    frozen = to_frozen_batchnorm2d(model)
    assert frozen[1].running_var.dtype == frozen[1].weight.dtype == dtype
    x = torch.randn(1, 1, 5, 5, dtype=dtype)
    assert frozen(x).dtype == dtype
