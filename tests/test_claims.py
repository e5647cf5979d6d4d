"""bnlab.claims: the measuring tools of notebook 08, on synthetic data."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bnlab import claims, modules
from bnlab.data import TensorLoader
from bnlab.models import mlp
from bnlab.train import History, evaluate


def test_noisy_shift_redraws_in_training_and_is_its_expectation_in_eval():
    layer = claims.NoisyShift(3, strength=2.0, seed=0)
    x = torch.randn(16, 3, 4, 4)
    a, b = layer(x), layer(x)
    assert (a - b).abs().max() > 0.1  # a new draw every step
    # the per-channel shift of a draw is bounded by the strength (plus the small per-unit noise)
    assert (a - x).mean(dim=(0, 2, 3)).abs().max() < 2.0 + 0.5
    layer.eval()
    torch.testing.assert_close(layer(x), 2.0 * x)  # 1 + strength / 2
    assert torch.equal(claims.NoisyShift(3, strength=0.0).train()(x), x)
    with pytest.raises(ValueError, match="strength"):
        claims.NoisyShift(3, strength=-1)


def test_add_noise_after_bn_wraps_every_batch_norm():
    model = mlp(depth=3, bn="bnlab")
    claims.add_noise_after_bn(model, 1.0)
    wrapped = [m for m in model if isinstance(m, nn.Sequential)]
    assert len(wrapped) == 3
    assert all(isinstance(w[0], modules.BatchNorm1d) for w in wrapped)
    assert all(isinstance(w[1], claims.NoisyShift) for w in wrapped)
    assert model(torch.randn(4, 784)).shape == (4, 10)
    with pytest.raises(ValueError, match="no BatchNorm"):
        claims.add_noise_after_bn(mlp(depth=2), 1.0)


def test_shift_monitor_measures_the_step_to_step_change():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20000, 2, generator=g)
    with claims.ShiftMonitor(model) as monitor:
        for step in range(4):
            model(base * (1 + step) + 3.0 * step)  # mean +3, std +1 per step
        model.eval()
        model(base * 100)  # eval forwards are not recorded
    assert len(monitor.means["1"]) == 4
    assert monitor.shift() == pytest.approx([4.0], abs=0.05)
    assert model[1]._forward_pre_hooks == {}  # hooks removed on exit
    with pytest.raises(ValueError, match="fewer than 2"):
        claims.ShiftMonitor(model).shift()
    with pytest.raises(ValueError, match="no layer"):
        claims.ShiftMonitor(nn.Linear(2, 2))


def test_moments_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    gauss = claims.moments(torch.randn(200000, 2, generator=g) * 3 + 1)
    assert gauss["mean"] == pytest.approx(1, abs=0.03)
    assert gauss["std"] == pytest.approx(3, rel=0.01)
    assert abs(gauss["skew"]) < 0.03 and abs(gauss["kurtosis"]) < 0.05
    relu = claims.moments(torch.relu(torch.randn(200000, 1, generator=g)))
    assert relu["skew"] > 1.0  # a half-Gaussian with a spike at 0: far from Gaussian
    assert relu["mean"] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=0.01)


def _bn_classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), modules.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_accuracy_with_batch_stats_leaves_the_model_alone_and_differs_from_eval():
    model = _bn_classifier()
    x, y = torch.randn(60, 4), torch.arange(60) % 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    loader = TensorLoader(x, y, batch_size=20)
    acc = claims.accuracy_with_batch_stats(model, loader)
    assert 0.0 <= acc <= 1.0 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # eval mode: a sample's output does not depend on its batch-mates
        assert torch.equal(model(x[:2])[0], model(x[:1])[0])


def test_accuracy_with_batch_stats_depends_on_the_batch():
    # BN(1) then class 0 if the normalized value is > 0, else class 1. The running stats
    # (mean 0, var 1) keep the sign of x; a batch's own mean moves the threshold.
    bn = modules.BatchNorm1d(1, affine=False)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model = nn.Sequential(bn, head).eval()
    x, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0, 0])
    assert evaluate(model, [(x, y)])[1] == 1.0  # running stats: both positive, both class 0
    # batch stats: normalized to (-1, 1), so the first sample flips to class 1
    assert claims.accuracy_with_batch_stats(model, [(x, y)]) == 0.5
    # the same first sample with a batch-mate below it is normalized to +1: right again
    assert (
        claims.accuracy_with_batch_stats(
            model, [(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]))]
        )
        == 1.0
    )


def test_class_sorted_groups_labels():
    y = torch.tensor([2, 0, 1, 0, 2, 1])
    loader = claims.class_sorted(TensorLoader(torch.arange(6.0)[:, None], y, 2, shuffle=True))
    assert [b.tolist() for _, b in loader] == [[0, 0], [1, 1], [2, 2]]
    assert [x.flatten().tolist() for x, _ in loader][0] == [1.0, 3.0]


def test_mlp_stack_follows_the_order():
    model = claims.mlp_stack(("linear", "dropout", "bn", "relu"), depth=2, width=16, p=0.3)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", *["Linear", "Dropout", "BatchNorm1d", "ReLU"] * 2, "Linear"]
    assert model[2].p == 0.3
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    with pytest.raises(ValueError, match="order"):
        claims.mlp_stack(("bn", "relu"))
    with pytest.raises(ValueError, match="order"):
        claims.mlp_stack(("linear", "gelu"))


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
    assert claims.variance_shift(plain, x) == pytest.approx([1.0], abs=0.01)
    p = 0.5
    torch.manual_seed(0)
    dropped = nn.Sequential(nn.Dropout(p), modules.BatchNorm1d(8))
    _trained_running_var(dropped, x)
    # train: var(mask * x / (1 - p)) = var(x) / (1 - p); eval sees var(x): ratio 1 - p
    assert claims.variance_shift(dropped, x) == pytest.approx([1 - p], abs=0.03)
    assert dropped.training  # mode restored
    with pytest.raises(ValueError, match="no BatchNorm"):
        claims.variance_shift(nn.Linear(8, 8), x)


def test_generalization_gap_compares_eval_accuracies():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    data = SimpleNamespace(
        train=TensorLoader(x, torch.tensor([0, 1]), 2),
        test=TensorLoader(x, torch.tensor([0, 0]), 2),
    )
    assert claims.generalization_gap(model, data) == {"train": 1.0, "test": 0.5, "gap": 0.5}


@pytest.mark.parametrize("kind", ["batch", "layer", "instance", "group", "none"])
def test_small_cnn_runs_with_each_norm(kind):
    model = claims.small_cnn(kind, width=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert (model[0].bias is None) == (kind != "none")


def test_epochs_to():
    h = History(test_acc=[0.2, 0.5, 0.7])
    assert claims.epochs_to(h, 0.5) == 2
    assert claims.epochs_to(h, 0.9) == math.inf
