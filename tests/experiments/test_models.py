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


# ----------------------------------------------------------------------------- BN position


def test_bn_after_the_nonlinearity_in_lenet():
    model = models.lenet(bn="bnlab", activation="relu", bn_position="after")
    names = [type(m).__name__ for m in model]
    assert names == [
        "Conv2d", "ReLU", "BatchNorm2d", "AvgPool2d",
        "Conv2d", "ReLU", "BatchNorm2d", "AvgPool2d", "Flatten",
        "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear",
    ]  # fmt: skip
    assert [m.num_features for m in model if modules.is_batchnorm(m)] == [6, 16, 120, 84]
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert models.count_parameters(model) == models.count_parameters(models.lenet(bn="bnlab"))


@pytest.mark.parametrize(
    "position, block",
    [("before", ["Linear", "BatchNorm1d", "Tanh"]), ("after", ["Linear", "Tanh", "BatchNorm1d"])],
)
def test_mlp_bn_position(position, block):
    model = mlp(width=8, depth=2, bn="torch", bn_position=position)
    assert [type(m).__name__ for m in model] == ["Flatten", *block * 2, "Linear"]
    assert [m.num_features for m in model if modules.is_batchnorm(m)] == [8, 8]
    assert model(torch.randn(3, 784)).shape == (3, 10)
    if position == "before":  # the default
        assert repr(model) == repr(mlp(width=8, depth=2, bn="torch"))


def test_bn_position_is_validated():
    for build in (models.lenet, mlp):
        with pytest.raises(ValueError, match="bn_position"):
            build(bn="torch", bn_position="between")
    plain = [type(m).__name__ for m in mlp(depth=1, bn_position="after")]
    assert plain == ["Flatten", "Linear", "Tanh", "Linear"]  # no BN: nothing to place


# ----------------------------------------------------------------------------- Kaiming init


def test_init_kaiming_std_is_sqrt_2_over_fan_in_and_biases_are_zero():
    seed_everything(0)
    model = models.init_kaiming(nn.Sequential(nn.Linear(2048, 512), nn.Conv2d(64, 128, 3)))
    for layer, fan_in in zip(model, (2048, 64 * 9), strict=True):
        assert layer.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.02)
        assert layer.weight.mean().abs().item() < 0.02 * (2 / fan_in) ** 0.5 * 10
        assert torch.count_nonzero(layer.bias) == 0
    bn_model = models.init_kaiming(models.lenet(bn="torch"))
    assert torch.all(bn_model[1].weight == 1.0)  # BN's gamma untouched


# ----------------------------------------------------------------------------- ResNet


def blocks(model: nn.Module) -> list[models.BasicBlock]:
    return [m for m in model.modules() if isinstance(m, models.BasicBlock)]


def test_small_resnet_shapes_stages_and_init():
    seed_everything(0)
    model = models.small_resnet(num_blocks=(2, 1, 3), width=8)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    found = blocks(model)
    assert len(found) == 6
    assert [b.conv1.out_channels for b in found] == [8, 8, 16, 32, 32, 32]
    assert [b.conv1.stride[0] for b in found] == [1, 1, 2, 2, 1, 1]
    assert [b.downsample is not None for b in found] == [False, False, True, True, False, False]
    sizes = []
    with torch.no_grad():
        x = model[2](model[1](model[0](torch.randn(1, 1, 28, 28))))
        for stage in model[3:6]:
            x = stage(x)
            sizes.append(tuple(x.shape[1:]))
    assert sizes == [(8, 28, 28), (16, 14, 14), (32, 7, 7)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    conv = found[2].conv2  # Kaiming normal, fan_out = 16 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.1)
    rgb = models.small_resnet(in_channels=3, num_classes=5)
    assert rgb(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="num_blocks"):
        models.small_resnet(num_blocks=(2, 2))


@pytest.mark.parametrize("training", [True, False])
def test_zero_init_residual_blocks_start_as_their_shortcut(training):
    seed_everything(0)
    model = models.small_resnet(width=8, zero_init_residual=True).train(training)
    for block in blocks(model):
        x = torch.relu(torch.randn(4, block.conv1.in_channels, 14, 14))  # after a ReLU: >= 0
        with torch.no_grad():
            out = block(x)
            expected = x if block.downsample is None else torch.relu(block.downsample(x))
        assert torch.equal(out, expected)
    plain = models.small_resnet(width=8)
    identity = blocks(plain)[1]
    x = torch.relu(torch.randn(4, 8, 14, 14))
    assert not torch.equal(identity(x), x)  # without it, the residual branch is not zero


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_last_gamma_matches_torchvisions_zero_init_residual(arch):
    resnet = pytest.importorskip("torchvision.models.resnet")

    def zeroed(model: nn.Module) -> set[str]:
        return {
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and torch.all(m.weight == 0)
        }

    ours = models.zero_init_last_gamma(getattr(resnet, arch)())
    expected = zeroed(getattr(resnet, arch)(zero_init_residual=True))
    assert expected and zeroed(ours) == expected
    assert zeroed(getattr(resnet, arch)()) == set()
    with pytest.raises(ValueError, match="residual block"):
        models.zero_init_last_gamma(models.lenet(bn="torch"))


# ----------------------------------------------------------------------------- Batch Renorm


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.lenet(bn="torch", activation="relu"),
        lambda: models.lenet(bn="bnlab", activation="relu"),
        lambda: models.small_resnet(width=4, num_blocks=(1, 1, 1)),
    ],
)
def test_with_batch_renorm_keeps_parameters_and_statistics(build):
    from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d

    seed_everything(0)
    model = build()
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(s)) + 0.5)
        for m in model.modules():
            if modules.is_batchnorm(m):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    old = [m for m in model.modules() if modules.is_batchnorm(m)]
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    expected = model.eval()(x)
    models.with_batch_renorm(model, r_max=2.0, d_max=1.0)
    new = [m for m in model.modules() if isinstance(m, (BatchRenorm1d, BatchRenorm2d))]
    assert not any(modules.is_batchnorm(m) for m in model.modules())
    assert len(new) == len(old)
    for a, b in zip(old, new, strict=True):
        want = BatchRenorm2d if "2d" in type(a).__name__ else BatchRenorm1d
        assert type(b) is want and (b.r_max, b.d_max) == (2.0, 1.0)
        assert (b.eps, b.momentum, b.training) == (a.eps, a.momentum, a.training)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(model(x), expected)  # eval: the same network


def test_with_batch_renorm_at_r_max_1_trains_like_bn_and_refuses_what_it_cannot_swap():
    seed_everything(0)
    model = models.lenet(bn="torch", activation="relu").double().train()
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    expected = model(x)
    models.with_batch_renorm(model, r_max=1.0, d_max=0.0)
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=1e-10)
    first = next(m for m in model.modules() if hasattr(m, "r_max"))
    assert first.running_mean.dtype == first.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="no BatchNorm"):
        models.with_batch_renorm(models.lenet())
    with pytest.raises(ValueError, match="BatchRenorm1d/2d"):
        models.with_batch_renorm(nn.Sequential(nn.BatchNorm3d(2)))
    with pytest.raises(ValueError, match="r_max"):
        models.with_batch_renorm(models.lenet(bn="torch"), r_max=0.5)
