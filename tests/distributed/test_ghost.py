"""bnlab.distributed.ghost: ghost BN is BN per chunk in training, BN in eval, BN at N <= size."""

from __future__ import annotations

import pytest
import torch
from helpers import bn_lenet, images
from torch import nn

from bnlab.distributed.ghost import GhostBatchNorm1d, GhostBatchNorm2d, convert_ghost_batchnorm
from bnlab.nn.hooks import batchnorm_layers

CASES = [
    (GhostBatchNorm2d, nn.BatchNorm2d, (12, 3, 4, 4)),
    (GhostBatchNorm1d, nn.BatchNorm1d, (12, 3)),
]


def _pair(ghost_cls, bn_cls, size, momentum=0.1):
    torch.manual_seed(0)
    ghost, ref = ghost_cls(3, size, momentum=momentum), bn_cls(3, momentum=momentum)
    with torch.no_grad():
        for layer in (ghost, ref):
            layer.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return ghost, ref


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", CASES)
@pytest.mark.parametrize("size", [12, 20])
def test_a_virtual_batch_of_n_or_more_is_batchnorm(ghost_cls, bn_cls, shape, size):
    ghost, ref = _pair(ghost_cls, bn_cls, size)
    x = torch.randn(shape) * 3 + 1
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(shape)
    ghost(xg).backward(dy)
    ref(xr).backward(dy)
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ghost.running_var, ref.running_var)


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", CASES)
@pytest.mark.parametrize("size, momentum", [(4, 0.1), (5, 0.1), (3, None)])
def test_training_is_batchnorm_applied_to_each_chunk_in_turn(
    ghost_cls, bn_cls, shape, size, momentum
):
    ghost, ref = _pair(ghost_cls, bn_cls, size, momentum)
    x = torch.randn(shape) * 3 + 1
    xg = x.clone().requires_grad_()
    chunks = [c.clone().requires_grad_() for c in x.split(size)]  # 12 = 5 + 5 + 2 too
    dy = torch.randn(shape)
    out = ghost(xg)
    want = torch.cat([ref(c) for c in chunks])
    torch.testing.assert_close(out, want)
    out.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(xg.grad, torch.cat([c.grad for c in chunks]))
    torch.testing.assert_close(ghost.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    assert int(ghost.num_batches_tracked) == len(chunks)
    # and it differs from BN over the whole batch
    whole = bn_cls(3)
    with torch.no_grad():
        whole.load_state_dict(ref.state_dict())
    assert (out - whole.train()(x)).abs().max() > 1e-3


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", CASES)
def test_eval_is_batchnorm_with_the_running_statistics(ghost_cls, bn_cls, shape):
    ghost, ref = _pair(ghost_cls, bn_cls, 4)
    x = torch.randn(shape) * 2
    ghost(x), ref(x)  # different running statistics after one step ...
    ref.load_state_dict(ghost.state_dict())  # ... the same keys, so copy them
    ghost.eval(), ref.eval()
    torch.testing.assert_close(ghost(x), ref(x))


def test_virtual_batch_size_is_checked():
    with pytest.raises(ValueError, match=">= 1"):
        GhostBatchNorm2d(3, 0)
    with pytest.raises(TypeError, match="int"):
        GhostBatchNorm1d(3, 2.5)


@pytest.mark.parametrize("bn", ["torch", "bnlab"])
def test_convert_shares_tensors_and_keeps_modes(bn):
    model = bn_lenet(bn)
    before = [m for _, m in batchnorm_layers(model)]
    before[1].eval()
    convert_ghost_batchnorm(model, 4)
    after = [m for _, m in batchnorm_layers(model)]
    assert [type(m).__name__ for m in after] == ["GhostBatchNorm2d"] * 2 + ["GhostBatchNorm1d"] * 2
    for old, new in zip(before, after, strict=True):
        assert new.weight is old.weight and new.running_var is old.running_var
        assert new.training == old.training and new.virtual_batch_size == 4
    assert model(images(8)).shape == (8, 10)
    with pytest.raises(ValueError, match="1d and 2d"):
        convert_ghost_batchnorm(nn.Sequential(nn.BatchNorm3d(2)), 4)
