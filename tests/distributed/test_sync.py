"""bnlab.distributed.sync: SyncBatchNorm without a group, in a group of one, in a group of two.

The full equality over ranks is tests/distributed/test_equality.py; here: the fallbacks,
the drop-in surface, convert_sync_batchnorm, errors on every rank, torch's CPU refusal.
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.distributed as dist
from helpers import bn_lenet, images
from torch import nn

from bnlab.distributed import equality, launch
from bnlab.distributed.sync import SyncBatchNorm
from bnlab.nn import modules
from bnlab.nn.hooks import batchnorm_layers

SHAPES = {nn.BatchNorm1d: (6, 3), nn.BatchNorm2d: (5, 3, 4, 4), nn.BatchNorm3d: (4, 3, 2, 3, 3)}


@pytest.fixture(scope="module")
def in_group():
    """checks_worker's findings on each of two spawned gloo ranks (one group for them all)."""
    start = time.monotonic()
    found = launch.run(2, equality.checks_worker, timeout=90)
    return found, time.monotonic() - start


def _pair(cls, affine=True, momentum=0.1):
    torch.manual_seed(0)
    ref = cls(3, affine=affine, momentum=momentum)
    ours = SyncBatchNorm(3, affine=affine, momentum=momentum)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("cls", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_a_group_it_is_plain_batchnorm(cls, momentum):
    assert not dist.is_initialized()
    ref, ours = _pair(cls, momentum=momentum)
    for step in range(3):
        x = torch.randn(SHAPES[cls], generator=torch.Generator().manual_seed(step)) * 2 + 1
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.testing.assert_close(ours(b), ref(a))
        dy = torch.randn_like(x)
        ref_grads = torch.autograd.grad(ref(a), (a, ref.weight), dy)
        torch.testing.assert_close(torch.autograd.grad(ours(b), (b, ours.weight), dy), ref_grads)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ref.eval(), ours.eval()
    x = torch.randn(SHAPES[cls])
    torch.testing.assert_close(ours(x), ref(x))


def test_a_group_of_one_is_plain_batchnorm(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref, ours = _pair(nn.BatchNorm2d)
        x = torch.randn(SHAPES[nn.BatchNorm2d])
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def test_it_has_torchs_constructor_and_state_dict():
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [
        (p.name, p.default, p.kind) for p in theirs.values()
    ]
    ref, ours = nn.SyncBatchNorm(4), SyncBatchNorm(4)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert SyncBatchNorm(4, track_running_stats=False).running_mean is None
    assert modules.is_batchnorm(ours)


def test_it_takes_any_input_of_rank_two_or_more_and_says_so_otherwise():
    layer = SyncBatchNorm(3)
    for shape in ((4, 3), (4, 3, 2), (2, 3, 2, 2), (2, 3, 2, 2, 2), (2, 3, 2, 2, 2, 2)):
        assert layer(torch.randn(shape)).shape == shape
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(4, 5))


@pytest.mark.parametrize("bn", ["torch", "bnlab"])
def test_convert_sync_batchnorm_keeps_parameters_buffers_and_modes(bn):
    model = bn_lenet(bn)
    model.train()
    with torch.no_grad():
        model(images(16))  # running statistics that are not the initial ones
    layers = batchnorm_layers(model)
    assert len(layers) >= 3
    layers[0][1].weight.requires_grad_(False)
    layers[1][1].eval()
    before = {name: (m, m.weight, m.bias, m.running_mean, m.running_var) for name, m in layers}
    counts = {name: int(m.num_batches_tracked) for name, m in layers}
    model.eval()
    x = images(8, seed=3)
    with torch.no_grad():
        want = model(x)
    model.train()
    layers[1][1].eval()

    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    after = dict(batchnorm_layers(model))
    assert list(after) == list(before)
    for name, (old, weight, bias, mean, var) in before.items():
        new = after[name]
        assert type(new) is SyncBatchNorm and new is not old
        assert new.weight is weight and new.bias is bias
        assert new.running_mean is mean and new.running_var is var
        assert int(new.num_batches_tracked) == counts[name]
        assert (new.eps, new.momentum, new.affine) == (old.eps, old.momentum, old.affine)
        assert new.training == old.training
    assert after[layers[0][0]].weight.requires_grad is False
    assert after[layers[1][0]].training is False and after[layers[2][0]].training is True
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_convert_sync_batchnorm_leaves_a_model_without_batchnorm_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert SyncBatchNorm.convert_sync_batchnorm(model) is model
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_convert_sync_batchnorm_of_a_bare_layer_returns_the_new_layer():
    bn = nn.BatchNorm1d(5, momentum=None, affine=False)
    group = object()  # stored, not used until a group is initialized
    sync = SyncBatchNorm.convert_sync_batchnorm(bn, process_group=group)
    assert isinstance(sync, SyncBatchNorm) and sync.process_group is group
    assert sync.momentum is None and sync.weight is None
    assert sync.running_mean is bn.running_mean


@pytest.mark.parametrize("argument", equality.MISMATCHES)
def test_ranks_that_disagree_all_raise_an_error_naming_the_argument(in_group, argument):
    found, seconds = in_group
    words = {
        "num_features": "num_features",
        "dtype": "dtype",
        "ndim": "input's rank",
        "momentum": "momentum must be in",
    }
    for rank, checks in enumerate(found):
        kind, message, took = checks["mismatch"][argument]
        assert kind == "ValueError", (rank, message)
        assert words[argument] in message, (rank, message)
        assert took < 5.0  # raised at once, not after a collective's timeout
    assert seconds < 60


def test_one_value_per_channel_over_all_ranks_raises_on_every_rank(in_group):
    found, _ = in_group
    for checks in found:  # rank 0 holds one row, rank 1 none
        assert "Expected more than 1 value per channel" in checks["single_value"]


def test_eval_mode_in_a_group_is_torchs_batchnorm_without_communication(in_group):
    found, _ = in_group
    for checks in found:  # the ranks made different numbers of calls: no collective ran
        assert checks["eval_error"] < 1e-6


def test_torchs_own_syncbatchnorm_refuses_cpu_input_in_a_group(in_group):
    """The module docstring's claim about torch 2.14.1, kept true for the installed torch."""
    found, _ = in_group
    for checks in found:
        assert checks["torch_refusal"].startswith(
            "ValueError: SyncBatchNorm expected input tensor to be on GPU or XPU"
        )


def test_torch_users_find_syncbatchnorm_where_they_expect_it():
    """``from bnlab.distributed import SyncBatchNorm``, as ``torch.nn.SyncBatchNorm`` is."""
    import bnlab.distributed as D
    from bnlab.distributed import SyncBatchNorm as exported
    from bnlab.distributed import ghost, sync

    assert exported is SyncBatchNorm and callable(exported.convert_sync_batchnorm)
    assert D.sync_batch_norm is sync.sync_batch_norm and D.run is launch.run
    assert D.GhostBatchNorm2d is ghost.GhostBatchNorm2d
    assert D.convert_ghost_batchnorm is ghost.convert_ghost_batchnorm
    assert all(hasattr(D, name) for name in D.__all__)
