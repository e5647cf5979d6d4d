"""bnlab.experiments.models: LeNet shapes in d2l's layout, BN placement, init helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments import models
from bnlab.experiments.models import mlp
from bnlab.nn import modules


def layer_shapes(model: nn.Sequential, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for layer in model:
        x = layer(x)
        shapes.append((type(layer).__name__, tuple(x.shape)))
    return shapes


def test_lenet_shapes_match_d2l():
    # d2l 7.6 / 6.6 prints exactly this table for a (1, 1, 28, 28) input
    assert layer_shapes(models.lenet().eval(), torch.zeros(1, 1, 28, 28)) == [
        ("Conv2d", (1, 6, 28, 28)),
        ("Sigmoid", (1, 6, 28, 28)),
        ("AvgPool2d", (1, 6, 14, 14)),
        ("Conv2d", (1, 16, 10, 10)),
        ("Sigmoid", (1, 16, 10, 10)),
        ("AvgPool2d", (1, 16, 5, 5)),
        ("Flatten", (1, 400)),
        ("Linear", (1, 120)),
        ("Sigmoid", (1, 120)),
        ("Linear", (1, 84)),
        ("Sigmoid", (1, 84)),
        ("Linear", (1, 10)),
    ]
    n_params = sum(p.numel() for p in models.lenet().parameters())
    assert n_params == 61706  # LeNet-5 as in d2l


@pytest.mark.parametrize(
    "bn,classes",
    [
        ("torch", (nn.BatchNorm2d, nn.BatchNorm1d)),
        ("bnlab", (modules.BatchNorm2d, modules.BatchNorm1d)),
    ],
)
def test_bn_follows_each_conv_and_hidden_linear_before_the_nonlinearity(bn, classes):
    model = models.lenet(bn=bn, activation="relu")
    names = [type(m).__name__ for m in model]
    assert names == [
        "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "Flatten",
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear",
    ]  # fmt: skip
    norms = [m for m in model if "BatchNorm" in type(m).__name__]
    assert [type(m) for m in norms] == [classes[0], classes[0], classes[1], classes[1]]
    assert [m.num_features for m in norms] == [6, 16, 120, 84]
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bn must be"):
        models.lenet(bn="keras")
    with pytest.raises(ValueError, match="activation must be"):
        models.lenet(activation="gelu")
    with pytest.raises(ValueError, match="std must be"):
        models.init_normal(models.lenet(), -1.0)


def test_init_xavier_bounds_and_keeps_biases():
    seed_everything(0)
    model = models.lenet()
    biases = [m.bias.detach().clone() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    models.init_xavier(model)
    for layer, bias in zip(
        [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))], biases, strict=True
    ):
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
        assert torch.equal(layer.bias, bias)


def test_init_normal_scale():
    seed_everything(0)
    model = models.init_normal(models.lenet(bn="torch"), 0.5)
    fc = model[9]
    assert isinstance(fc, nn.Linear)
    assert fc.weight.std().item() == pytest.approx(0.5, rel=0.02)
    assert torch.count_nonzero(fc.bias) == 0
    assert torch.all(model[1].weight == 1.0)  # BN's gamma untouched


def test_noisy_shift_redraws_in_training_and_is_its_expectation_in_eval():
    layer = models.NoisyShift(3, strength=2.0, seed=0)
    x = torch.randn(16, 3, 4, 4)
    a, b = layer(x), layer(x)
    assert (a - b).abs().max() > 0.1  # a new draw every step
    # the per-channel shift of a draw is bounded by the strength (plus the small per-unit noise)
    assert (a - x).mean(dim=(0, 2, 3)).abs().max() < 2.0 + 0.5
    layer.eval()
    torch.testing.assert_close(layer(x), 2.0 * x)  # 1 + strength / 2
    assert torch.equal(models.NoisyShift(3, strength=0.0).train()(x), x)
    with pytest.raises(ValueError, match="strength"):
        models.NoisyShift(3, strength=-1)


def test_add_noise_after_bn_wraps_every_batch_norm():
    model = mlp(depth=3, bn="bnlab")
    models.add_noise_after_bn(model, 1.0)
    wrapped = [m for m in model if isinstance(m, nn.Sequential)]
    assert len(wrapped) == 3
    assert all(isinstance(w[0], modules.BatchNorm1d) for w in wrapped)
    assert all(isinstance(w[1], models.NoisyShift) for w in wrapped)
    assert model(torch.randn(4, 784)).shape == (4, 10)
    with pytest.raises(ValueError, match="no BatchNorm"):
        models.add_noise_after_bn(mlp(depth=2), 1.0)


def test_mlp_stack_follows_the_order():
    model = models.mlp_stack(("linear", "dropout", "bn", "relu"), depth=2, width=16, p=0.3)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", *["Linear", "Dropout", "BatchNorm1d", "ReLU"] * 2, "Linear"]
    assert model[2].p == 0.3
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    with pytest.raises(ValueError, match="order"):
        models.mlp_stack(("bn", "relu"))
    with pytest.raises(ValueError, match="order"):
        models.mlp_stack(("linear", "gelu"))


@pytest.mark.parametrize("kind", ["batch", "layer", "instance", "group", "none"])
def test_small_cnn_runs_with_each_norm(kind):
    model = models.small_cnn(kind, width=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert (model[0].bias is None) == (kind != "none")


def test_count_parameters_dropout_mlp_and_group_norm_swap():
    assert models.count_parameters(models.lenet()) == 61706
    first, last = models.dropout_mlp(True), models.dropout_mlp(False)
    assert [type(m).__name__ for m in first][3:6] == ["Dropout", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in last][3:6] == ["Linear", "BatchNorm1d", "Dropout"]
    assert first(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    gn = models.with_group_norm(models.lenet(bn="torch", activation="relu"), groups=4)
    norms_ = [m for m in gn if isinstance(m, nn.GroupNorm)]
    assert [(g.num_groups, g.num_channels) for g in norms_] == [(2, 6), (4, 16), (4, 120), (4, 84)]
    assert not any(modules.is_batchnorm(m) for m in gn.modules())
    assert gn(torch.randn(1, 1, 28, 28)).shape == (1, 10)  # batch of 1: no batch statistics
