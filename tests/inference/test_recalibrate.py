"""Tests for bnlab.inference.recalibrate: precise-BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import BN_KINDS, bn_lenet, images, warm_up
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments.data import TensorLoader
from bnlab.experiments.models import lenet
from bnlab.inference.freeze import freeze_bn
from bnlab.inference.recalibrate import recalibrate_bn, stats_error
from bnlab.nn.hooks import batchnorm_layers

# ------------------------------------------------------------------------------ recalibrate


def _population(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3)
    return x.mean(dim=dims), x.var(dim=dims, unbiased=True)


@pytest.mark.parametrize("bn", BN_KINDS)
def test_recalibrate_gives_population_statistics(bn):
    model = bn_lenet(bn)
    warm_up(model)
    x = images(100) * 3 - 1
    # Uneven batches (32, 32, 32, 4): the statistics are those of all 100 images at once.
    used = recalibrate_bn(model, TensorLoader(x, torch.zeros(100), batch_size=32))
    assert used == 4
    with torch.no_grad():
        conv_out = model[0](x)
    mean, var = _population(conv_out)
    torch.testing.assert_close(model[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, var, atol=1e-5, rtol=1e-5)
    assert model.training  # mode restored


def test_recalibrate_one_batch_equals_a_momentum_one_update():
    model = bn_lenet()
    x = images(50)
    reference = copy.deepcopy(model).train()
    for _n, layer in batchnorm_layers(reference):
        layer.momentum = 1.0
    with torch.no_grad():
        reference(x)
    recalibrate_bn(model.eval(), [x])
    assert not model.training
    assert stats_error(model, reference) < 1e-5


def test_recalibrate_matches_update_bn_on_equal_batches_and_order_does_not_matter():
    from torch.optim.swa_utils import update_bn

    model = bn_lenet()
    batches = [images(32, seed=s) for s in range(4)]
    ours, theirs, reversed_ = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_bn(ours, batches)
    recalibrate_bn(reversed_, batches[::-1])
    update_bn(batches, theirs)
    assert stats_error(ours, reversed_) < 1e-5
    # Equal batch sizes: identical means; update_bn's variance averages per-batch
    # variances, ours also counts the spread of the batch means: close, not equal.
    for (_n, a), (_m, b) in zip(batchnorm_layers(ours), batchnorm_layers(theirs), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.running_var, b.running_var, atol=1e-3, rtol=0.05)


def test_recalibrate_runs_dropout_off_by_default_and_skips_frozen_layers():
    seed_everything(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    x = torch.randn(400, 5)
    recalibrate_bn(net, [x])
    with torch.no_grad():
        clean = net[0](x)
    torch.testing.assert_close(net[2].running_var, clean.var(dim=0), atol=1e-5, rtol=1e-5)
    recalibrate_bn(net, [x], train_others=True)  # dropout on: inflated variance
    assert bool((net[2].running_var > 1.3 * clean.var(dim=0)).all())
    freeze_bn(net)
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        recalibrate_bn(net, [x])


def test_recalibrate_argument_errors():
    model = bn_lenet()
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(model, [images(4)], num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    with pytest.raises(TypeError, match="first"):
        recalibrate_bn(model, [["not a tensor"]])
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(lenet(), [images(4)])
