"""bnlab.nn.hooks: finding layers, hooking forwards, and leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import hooks, modules


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), modules.BatchNorm1d(8), nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), nn.Tanh(),
    )  # fmt: skip


def test_layers_and_batchnorm_layers_in_module_order():
    net = _net()
    assert [n for n, _ in hooks.batchnorm_layers(net)] == ["1", "3.1"]
    assert [n for n, _ in hooks.layers(net, (nn.ReLU, nn.Tanh))] == ["2", "4"]
    assert [n for n, _ in hooks.leaves(net)] == ["0", "1", "2", "3.0", "3.1", "4"]


def test_replace_modules_replaces_in_place_without_visiting_the_replacement():
    net = _net()
    seen = []

    def wrap(bn):
        seen.append(bn)
        return nn.Sequential(bn, nn.Identity())

    assert hooks.replace_modules(net, modules.is_batchnorm, wrap) is net
    assert len(seen) == 2 and isinstance(net[1], nn.Sequential) and net[1][0] is seen[0]
    assert [n for n, _ in hooks.batchnorm_layers(net)] == ["1.0", "3.1.0"]


def test_hooked_removes_its_hooks_even_when_the_block_raises():
    net, calls = _net(), []
    bns = [m for _, m in hooks.batchnorm_layers(net)]
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.hooked(bns, lambda m, args: calls.append(m)):
            net(torch.randn(5, 4))
            raise RuntimeError("boom")
    assert calls == bns
    net(torch.randn(5, 4))
    assert len(calls) == 2  # no hook left behind
    assert all(not bn._forward_pre_hooks for bn in bns)


def test_recording_inputs_and_outputs_by_name():
    net = _net()
    x = torch.randn(6, 4)
    with hooks.recording({"first": net[0], "act": net[4]}, "output") as out:
        y = net(x)
        net(x)
    assert [len(v) for v in out.values()] == [2, 2]
    assert torch.equal(out["act"][0], y) and not out["act"][0].requires_grad
    with hooks.recording(hooks.layers(net, nn.ReLU), "input") as inp:
        net(x)
    assert inp["2"][0].shape == (6, 8)
    with pytest.raises(ValueError, match="'input' or 'output'"):
        with hooks.recording([net[0]], "grad"):
            pass


def test_preserved_restores_modes_and_buffers():
    net = _net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with hooks.preserved(net, buffers=True):
        net.train()
        net(torch.randn(7, 4) * 5 + 3)
    assert not any(m.training for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with hooks.preserved(net):  # modes only: the running statistics may move
        net.train()
        net(torch.randn(7, 4) * 5 + 3)
    assert not net.training and not torch.equal(net[1].running_mean, before["1.running_mean"])
