"""bnlab.inference.fusion: folded layers and models compute what the unfused eval model computes."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.quantization import fuse_modules
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnlab.experiments import models
from bnlab.inference import fusion
from bnlab.inference.fusion import FusionError
from bnlab.nn import modules

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-12, rtol=1e-10)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "bnlab": {1: modules.BatchNorm1d, 2: modules.BatchNorm2d, 3: modules.BatchNorm3d},
}


def random_case(seed: int):
    """A random (layer, bn, x, description) from the space the issue lists."""
    rng = random.Random(seed)
    kind = rng.choice(["conv", "convT", "linear"])
    dtype = rng.choice([torch.float32, torch.float64])
    bias, affine = rng.random() < 0.5, rng.random() < 0.5
    flavour = rng.choice(["torch", "bnlab"])
    if kind == "linear":
        fin, fout = rng.randint(1, 12), rng.randint(1, 12)
        layer = nn.Linear(fin, fout, bias=bias, dtype=dtype)
        bn = BN[flavour][1](fout, affine=affine, dtype=dtype)
        x = torch.randn(5, fin, dtype=dtype)
        desc = dict(kind=kind, dtype=dtype, bias=bias, affine=affine, bn=flavour)
        return layer, bn, x, desc
    dims = rng.choice([1, 2, 3])
    groups = rng.choice([1, 2, 3])
    cin, cout = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    cfg = dict(
        kernel_size=rng.choice([1, 2, 3]),
        stride=rng.choice([1, 2]),
        padding=rng.choice([0, 1]),
        dilation=rng.choice([1, 2]),
        groups=groups,
        bias=bias,
        dtype=dtype,
    )
    layer = (CONV if kind == "conv" else CONVT)[dims](cin, cout, **cfg)
    bn = BN[flavour][dims](cout, affine=affine, dtype=dtype)
    x = torch.randn(2, cin, *[rng.randint(5, 7)] * dims, dtype=dtype)
    channels_last = dims >= 2 and rng.random() < 0.5
    if channels_last:
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        layer = layer.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    desc = dict(kind=kind, dims=dims, channels_last=channels_last, bn=flavour, affine=affine, **cfg)
    return layer, bn, x, desc


@pytest.mark.parametrize("seed", range(60))
def test_random_fold_matches_unfused(seed):
    layer, bn, x, desc = random_case(seed)
    fusion.randomize_bn_(bn, seed)
    layer.eval(), bn.eval()
    before = layer.weight.detach().clone()
    folded = fusion.fold_bn(layer, bn)
    with torch.no_grad():
        want, got = bn(layer(x)), folded(x)
    torch.testing.assert_close(got, want, **TOL[x.dtype], msg=lambda m: f"{desc}: {m}")
    assert folded.weight.dtype == layer.weight.dtype and folded.bias.dtype == layer.weight.dtype
    assert folded.weight.stride() == layer.weight.stride()  # channels_last kept
    assert folded.bias is not None
    assert torch.equal(layer.weight, before), "fold_bn must not modify its inputs"


def test_agrees_with_torch_fuse_functions():
    """Every random case that torch's fuse_*_bn_eval supports gives the same fold."""
    checked = 0
    for seed in range(60):
        layer, bn, x, desc = random_case(seed)
        if desc["kind"] == "convT" and desc["groups"] > 1:
            continue  # torch's transpose=True fold mis-shapes the scale for groups > 1
        if desc["kind"] == "linear" and not desc["affine"]:
            continue  # torch's fuse_linear_bn_weights multiplies by bn.weight, None here
        bn = BN["torch"][desc.get("dims", 1)](_out(layer), affine=desc["affine"], dtype=x.dtype)
        layer, bn = layer.eval(), fusion.randomize_bn_(bn, seed).eval()
        ours = fusion.fold_bn(layer, bn)
        if desc["kind"] == "linear":
            theirs = fuse_linear_bn_eval(layer, bn)
        else:
            theirs = fuse_conv_bn_eval(layer, bn, transpose=desc["kind"] == "convT")
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), **TOL[x.dtype], msg=str(desc))
            torch.testing.assert_close(ours.weight, theirs.weight, **TOL[x.dtype])
        checked += 1
    assert checked >= 25


def _out(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _no_bn(model):
    return not any(isinstance(m, fusion.BATCH_NORMS) for m in model.modules())


@pytest.mark.parametrize("flavour", ["torch", "bnlab"])
def test_fold_model_lenet(flavour):
    model = fusion.randomize_bn_(models.lenet(bn=flavour), 1).eval()
    folded = fusion.fold_model(model)
    assert _no_bn(folded)
    assert not _no_bn(model), "fold_model must leave the input model unchanged"
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])
    if flavour == "torch":  # torch's two whole-model passes agree with bnlab's
        with torch.no_grad():
            torch.testing.assert_close(fx_fuse(model)(x), folded(x), **TOL[torch.float32])
            names = [["0", "1"], ["4", "5"], ["9", "10"], ["12", "13"]]
            ao = fuse_modules(model, names, inplace=False)
            torch.testing.assert_close(ao(x), folded(x), **TOL[torch.float32])


def test_fold_model_resnet18_float32_and_float64():
    torch.manual_seed(0)
    model = fusion.randomize_bn_(torchvision.models.resnet18(weights=None), 2).eval()
    folded = fusion.fold_model(model)
    assert _no_bn(folded)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = folded(x), model(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fx_fuse(model)(x), got, atol=1e-4, rtol=1e-4)
        d64 = fusion.fold_model(model.double())
        _, rel = fusion.max_difference(model(x.double()), d64(x.double()))
    assert rel < 1e-12


def test_fold_model_skips_conv_output_with_other_user():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # y has two users: folding would change the second

    model = fusion.randomize_bn_(Residual()).eval()
    folded = fusion.fold_model(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_fold_by_name_for_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = -x
            return self.bn(self.conv(x))

    model = fusion.randomize_bn_(Branchy()).eval()
    with pytest.raises(FusionError, match="cannot trace.*fold_by_name"):
        fusion.fold_model(model)
    folded = fusion.fold_by_name(model, [("conv", "bn")])
    assert _no_bn(folded)
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


# ----------------------------------------------------------------------------- refusals


def test_refuses_bn_in_training_mode():
    with pytest.raises(FusionError, match="bn is in training mode.*model.eval"):
        fusion.fold_bn(nn.Conv2d(2, 3, 1).eval(), nn.BatchNorm2d(3))


def test_refuses_conv_in_training_mode():
    with pytest.raises(FusionError, match="layer is in training mode.*eval"):
        fusion.fold_bn(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3).eval())


def test_refuses_model_in_training_mode():
    with pytest.raises(FusionError, match="model is in training mode"):
        fusion.fold_model(models.lenet(bn="torch"))


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, modules.BatchNorm2d])
def test_refuses_bn_without_running_stats(cls):
    bn = cls(3, track_running_stats=False).eval()
    with pytest.raises(FusionError, match="no running statistics.*track_running_stats"):
        fusion.fold_bn(nn.Conv2d(2, 3, 1).eval(), bn)


def test_refuses_channel_mismatch():
    with pytest.raises(FusionError, match="channel mismatch.*3 output channels.*num_features=4"):
        fusion.fold_bn(nn.Conv2d(2, 3, 1).eval(), nn.BatchNorm2d(4).eval())


def test_refuses_conv_used_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    with pytest.raises(FusionError, match="'conv' is a conv used twice.*deepcopy"):
        fusion.fold_model(Shared().eval())


def test_refuses_non_foldable_layer():
    with pytest.raises(FusionError, match="layer must be one of"):
        fusion.fold_bn(nn.AvgPool2d(2).eval(), nn.BatchNorm2d(3).eval())


# ----------------------------------------------------------------------------- BN before conv


@pytest.mark.parametrize("groups,mode", [(1, "zeros"), (2, "zeros"), (2, "reflect")])
def test_bn_before_conv_exact_without_zero_padding(groups, mode):
    padding = 0 if mode == "zeros" else 1
    conv = nn.Conv2d(4, 6, 3, groups=groups, padding=padding, padding_mode=mode).eval()
    bn = fusion.randomize_bn_(nn.BatchNorm2d(4), 3).eval()
    folded = fusion.fold_bn_into_next_conv(bn, conv)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), conv(bn(x)), **TOL[torch.float32])


def test_folded_layers_gain_a_bias_that_learns_like_the_weight():
    bn = fusion.randomize_bn_(nn.BatchNorm2d(4), 4).eval()
    after = fusion.fold_bn(nn.Conv2d(2, 4, 1, bias=False).eval(), bn)
    before = fusion.fold_bn_into_next_conv(bn, nn.Conv2d(4, 3, 1, bias=False).eval())
    for folded in (after, before):
        assert folded.bias is not None and folded.bias.requires_grad
        assert folded.bias.dtype == folded.weight.dtype


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, modules.BatchNorm2d])
def test_randomize_and_fold_bn_without_shift(cls):
    bn = fusion.randomize_bn_(cls(3, bias=False), 5).eval()  # torch >= 2.14: no beta
    assert bn.bias is None and not torch.equal(bn.weight, torch.ones(3))
    conv = nn.Conv2d(2, 3, 3).eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fusion.fold_bn(conv, bn)(x), bn(conv(x)), **TOL[torch.float32])


def test_bn_before_conv_refuses_zero_padding():
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    with pytest.raises(FusionError, match="pads with zeros"):
        fusion.fold_bn_into_next_conv(nn.BatchNorm2d(4).eval(), conv)


# ----------------------------------------------------------------------------- speed table


def test_fold_errors_per_dtype_leave_the_model_alone():
    model = fusion.randomize_bn_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), 1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = fusion.fold_errors(model, torch.randn(4, 2, 6, 6))
    assert set(errors) == {torch.float32, torch.float64}
    assert errors[torch.float32][1] < 1e-5 and errors[torch.float64][1] < 1e-13
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("length", [5, 7])
def test_linear_bn1d_on_3d_input_is_refused_not_folded_wrong(length):
    torch.manual_seed(0)
    features = 5
    model = fusion.randomize_bn_(nn.Sequential(nn.Linear(4, features), nn.BatchNorm1d(length)))
    model.eval()
    x = torch.randn(2, length, 4)
    with pytest.raises(FusionError, match=r"'0'.*'1'"):  # names the module path
        fusion.fold_model(model, x)
    if length == features:  # without an example input the guard refuses at call time
        with pytest.raises(FusionError, match=r"axis 1"):
            fusion.fold_model(model)(x)


def test_linear_bn1d_on_2d_input_still_folds_with_or_without_an_example():
    model = fusion.randomize_bn_(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))).eval()
    x = torch.randn(3, 4)
    for folded in (fusion.fold_model(model), fusion.fold_model(model, x)):
        assert fusion.max_difference(model(x), folded(x))[1] < 1e-6


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_fold_exactly_from_traced_shapes(name):
    import torchvision  # the course extra; make setup installs it

    torch.manual_seed(0)
    net = fusion.randomize_bn_(getattr(torchvision.models, name)(weights=None), 1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded = fusion.fold_model(net, x)
        assert not [n for n, _ in fusion.batchnorm_layers(folded)]
        assert fusion.max_difference(net(x), folded(x))[1] < 1e-5


def test_folding_does_not_move_the_global_random_state():
    model = fusion.randomize_bn_(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))).eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fusion.fold_model(model)
    assert torch.equal(torch.rand(3), expected)
