"""bnlab.models: LeNet shapes in d2l's layout, BN placement, init helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab import models, modules
from bnlab.config import seed_everything


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
