"""bnlab.experiments.probes: activation probes, on synthetic data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments import models, probes
from bnlab.nn import modules


def test_shift_monitor_measures_the_step_to_step_change():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20000, 2, generator=g)
    with probes.ShiftMonitor(model) as monitor:
        for step in range(4):
            model(base * (1 + step) + 3.0 * step)  # mean +3, std +1 per step
        model.eval()
        model(base * 100)  # eval forwards are not recorded
    assert len(monitor.means["1"]) == 4
    assert monitor.shift() == pytest.approx([4.0], abs=0.05)
    assert model[1]._forward_pre_hooks == {}  # hooks removed on exit
    with pytest.raises(ValueError, match="fewer than 2"):
        probes.ShiftMonitor(model).shift()
    with pytest.raises(ValueError, match="no layer"):
        probes.ShiftMonitor(nn.Linear(2, 2))


def test_moments_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    gauss = probes.moments(torch.randn(200000, 2, generator=g) * 3 + 1)
    assert gauss["mean"] == pytest.approx(1, abs=0.03)
    assert gauss["std"] == pytest.approx(3, rel=0.01)
    assert abs(gauss["skew"]) < 0.03 and abs(gauss["kurtosis"]) < 0.05
    relu = probes.moments(torch.relu(torch.randn(200000, 1, generator=g)))
    assert relu["skew"] > 1.0  # a half-Gaussian with a spike at 0: far from Gaussian
    assert relu["mean"] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=0.01)


def _trained_running_var(model: nn.Module, x: torch.Tensor, steps: int = 200) -> None:
    for bn in model.modules():
        if isinstance(bn, modules.BatchNorm1d):
            bn.momentum = None  # cumulative average: an exact estimate of the training variance
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)


def test_variance_shift_is_one_without_dropout_and_1_minus_p_with_dropout_before_bn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), modules.BatchNorm1d(8))
    _trained_running_var(plain, x, steps=5)
    assert probes.variance_shift(plain, x) == pytest.approx([1.0], abs=0.01)
    p = 0.5
    torch.manual_seed(0)
    dropped = nn.Sequential(nn.Dropout(p), modules.BatchNorm1d(8))
    _trained_running_var(dropped, x)
    # train: var(mask * x / (1 - p)) = var(x) / (1 - p); eval sees var(x): ratio 1 - p
    assert probes.variance_shift(dropped, x) == pytest.approx([1 - p], abs=0.03)
    assert dropped.training  # mode restored
    with pytest.raises(ValueError, match="no BatchNorm"):
        probes.variance_shift(nn.Linear(8, 8), x)


def test_shift_monitor_on_outputs_and_its_spread_curve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    with probes.ShiftMonitor(model, nn.Tanh, what="output") as monitor:
        for _ in range(3):
            model(torch.randn(16, 4))
    model(torch.randn(16, 4))  # outside: not recorded
    assert monitor.spread().shape == (3, 2) and (monitor.spread() > 0).all()
    assert all(len(v) == 3 for v in monitor.means.values())
    with pytest.raises(ValueError, match="'input' or 'output'"):
        probes.ShiftMonitor(model, nn.Tanh, what="grad")


def test_subnormal_gradients_are_counted_and_flushing_removes_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with torch.no_grad():  # every pre-activation -88: sigmoid ~ 6e-39, below float32's normals
        model[0].weight.zero_()
        model[0].bias.fill_(-88.0)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    assert probes.subnormal_gradients(model, x, y, threads=1) > 0
    model.zero_grad()
    assert probes.subnormal_gradients(model, x, y, flush=True, threads=1) == 0


def test_signal_and_gradient_sees_tails_and_per_layer_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    calm = probes.signal_and_gradient(model, x, y)
    assert calm["in tails"] == [0.0] and len(calm["grad norm"]) == 2
    assert 0 < calm["output std"][0] < calm["input std"][0]  # the sigmoid squeezes
    with torch.no_grad():
        model[0].weight.mul_(100)  # push the pre-activations into the flat tails
    hot = probes.signal_and_gradient(model, x, y)
    assert hot["in tails"][0] > 0.5
    with pytest.raises(ValueError, match="no layer"):
        probes.signal_and_gradient(nn.Linear(4, 3), x, y)


def test_relative_shift_is_in_units_of_the_layers_spread():
    seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh())
    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    shifts = {}
    for scale in (1.0, 100.0):
        net = copy.deepcopy(model)
        with torch.no_grad():
            net[0].weight.mul_(scale)
            net[0].bias.mul_(scale)
        with probes.ShiftMonitor(net, nn.Linear, what="output") as monitor, torch.no_grad():
            for x, _ in batches:
                net(x)
        shifts[scale] = (monitor.shift()[0], monitor.shift(relative=True)[0])
    assert shifts[100.0][0] == pytest.approx(100 * shifts[1.0][0], rel=1e-4)  # absolute: scales
    assert shifts[100.0][1] == pytest.approx(shifts[1.0][1], rel=1e-4)  # relative: does not


def test_gradient_ics_matches_its_definition_and_leaves_the_model_alone():
    seed_everything(0)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
    )
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    state = copy.deepcopy(model.state_dict())
    got = probes.gradient_ics(model, x, y, lr=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # by hand for the last layer: update layers 1 and 2 (weights and biases), keep layer 3
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in list(zip(shifted.parameters(), grads, strict=True))[:4]:
            p.sub_(0.5 * g)
    g_after = torch.autograd.grad(nn.functional.cross_entropy(shifted(x), y), shifted[4].weight)[0]
    want = ((g_after - grads[4]).norm() / grads[4].norm()).item()
    assert len(got) == 2 and got[1]["l2"] == pytest.approx(want, rel=1e-5)
    assert -1 <= got[0]["cosine"] <= 1 and got[0]["l2"] > 0
    assert (
        probes.gradient_ics(model, x, y, lr=0.0) == [{"l2": 0.0, "cosine": pytest.approx(1.0)}] * 2
    )


def test_gradient_ics_sees_the_same_noise_in_both_gradients():
    seed_everything(0)
    net = models.add_noise_after_bn(
        models.mlp(depth=2, width=6, in_features=8, num_classes=3, bn="torch")
    )
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    # no update: if the noise differed between G and G', they would differ
    assert all(r["l2"] == 0.0 for r in probes.gradient_ics(net, x, y, lr=0.0))


def test_gradient_ics_inside_a_shift_monitor_is_invisible_to_it():
    seed_everything(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with probes.ShiftMonitor(net, nn.Linear, what="output") as monitor:
        net(x)
        probes.gradient_ics(net, x, y, lr=0.1)  # copies the hooked model: must not record
        net(x)
    assert [len(v) for v in monitor.means.values()] == [2, 2]
