"""Tests for the pitfall helpers: freeze_bn, recalibrate_bn and the detector."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlab import modules
from bnlab.config import seed_everything
from bnlab.data import TensorLoader
from bnlab.doctor import PitfallWarning, check, diagnose, dynamic_findings, static_findings
from bnlab.freeze import (
    batchnorm_layers,
    freeze_bn,
    is_frozen,
    replace_modules,
    to_frozen_batchnorm2d,
    unfreeze_bn,
)
from bnlab.models import lenet, mlp
from bnlab.modules import is_batchnorm
from bnlab.recalibrate import recalibrate_bn, stats_error

BN_KINDS = ["torch", "bnlab"]


def _net(bn: str = "torch") -> nn.Sequential:
    seed_everything(0)
    return lenet(bn=bn, activation="relu")


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _warm_up(model: nn.Module, steps: int = 3) -> None:
    """A few train-mode forwards so the running statistics are not the initial 0 / 1."""
    model.train()
    with torch.no_grad():
        for s in range(steps):
            model(_images(32, seed=100 + s) * 2 + 0.5)


def _codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


# ------------------------------------------------------------------------------ freeze


@pytest.mark.parametrize("bn", BN_KINDS)
def test_requires_grad_false_alone_does_not_freeze_stats(bn):
    model = _net(bn)
    for _n, layer in batchnorm_layers(model):
        for p in layer.parameters():
            p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    model.train()
    model(_images())
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


@pytest.mark.parametrize("bn", BN_KINDS)
def test_freeze_bn_survives_train_and_an_optimizer_step(bn):
    model = _net(bn)
    _warm_up(model)
    freeze_bn(model)
    model.train()  # would undo a plain bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _images(), torch.arange(64) % 10
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for name, layer in batchnorm_layers(model):
        assert is_frozen(layer) and not layer.weight.requires_grad
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[f"{name}.{key}"], after[f"{name}.{key}"]), (name, key)
    assert not torch.equal(before["0.weight"], after["0.weight"])  # the rest still learns
    # Frozen in train mode == plain eval mode: predictions do not depend on the batch.
    model.train()
    one = model(x[:1])
    assert torch.allclose(one, model(x)[:1], atol=1e-5)


def test_freeze_stats_only_and_unfreeze():
    model = _net()
    freeze_bn(model, stats=True, affine=False)
    assert all(p.requires_grad for _n, b in batchnorm_layers(model) for p in b.parameters())
    unfreeze_bn(model.train())
    layer = model[1]
    assert not is_frozen(layer) and layer.training
    before = layer.running_mean.clone()
    model(_images())
    assert not torch.equal(before, layer.running_mean)  # updates again
    freeze_bn(model)
    unfreeze_bn(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_errors_name_the_problem():
    with pytest.raises(ValueError, match="no BatchNorm"):
        freeze_bn(lenet(bn=None))
    net = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze_bn(net)


@pytest.mark.parametrize("bn", BN_KINDS)
def test_frozen_batchnorm2d_matches_eval_and_has_no_parameters(bn):
    from torchvision.ops import FrozenBatchNorm2d

    model = _net(bn)
    _warm_up(model)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model).eval()
    frozen = to_frozen_batchnorm2d(copy.deepcopy(model)).train()
    assert isinstance(frozen[1], FrozenBatchNorm2d) and isinstance(frozen[5], FrozenBatchNorm2d)
    assert is_batchnorm(frozen[10])  # BatchNorm1d stays as it is
    for i in (10, 13):
        frozen[i].eval()
    x = _images()
    torch.testing.assert_close(frozen(x), reference(x), atol=1e-5, rtol=1e-5)
    names = [n for n, _ in frozen.named_parameters()]
    assert "1.weight" not in names and "1.running_mean" in dict(frozen.named_buffers())


def test_replace_modules_swaps_bn_for_groupnorm():
    model = replace_modules(
        _net(),
        lambda m: isinstance(m, nn.BatchNorm2d),
        lambda bn: nn.GroupNorm(2, bn.num_features),
    )
    assert isinstance(model[1], nn.GroupNorm) and isinstance(model[10], nn.BatchNorm1d)
    assert model(_images(4)).shape == (4, 10)


# ------------------------------------------------------------------------------ recalibrate


def _population(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = (0, 2, 3)
    return x.mean(dim=dims), x.var(dim=dims, unbiased=True)


@pytest.mark.parametrize("bn", BN_KINDS)
def test_recalibrate_gives_population_statistics(bn):
    model = _net(bn)
    _warm_up(model)
    x = _images(100) * 3 - 1
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
    model = _net()
    x = _images(50)
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

    model = _net()
    batches = [_images(32, seed=s) for s in range(4)]
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
    model = _net()
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(model, [_images(4)], num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    with pytest.raises(TypeError, match="first"):
        recalibrate_bn(model, [["not a tensor"]])
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(lenet(), [_images(4)])


# ------------------------------------------------------------------------------ detector


def test_static_findings_trigger_and_silence():
    bad = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.BatchNorm1d(8))
    bad.add_module("3", nn.Linear(8, 8, bias=True))
    bad.add_module("4", nn.BatchNorm1d(8))
    findings = static_findings(bad)
    assert _codes(findings) == ["bias-before-bn", "bn-after-dropout"]
    by_code = {f.code: f for f in findings}
    assert (
        by_code["bn-after-dropout"].layer == "2"
        and "Dropout" in by_code["bn-after-dropout"].message
    )
    assert (
        by_code["bias-before-bn"].layer == "3" and "bias=False" in by_code["bias-before-bn"].message
    )
    through = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8))
    assert [(f.code, f.layer) for f in static_findings(through)] == [("bn-after-dropout", "2")]
    assert "'0'" in static_findings(through)[0].message
    good = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Dropout(0.2))
    assert static_findings(good) == []
    # lenet() builds its convs with bias=True before BN: flagged once per BN layer.
    assert _codes(static_findings(lenet(bn="bnlab"))) == ["bias-before-bn"] * 4


def test_track_running_stats_set_late_is_flagged():
    late = nn.Sequential(nn.BatchNorm1d(3))
    late[0].track_running_stats = False
    assert _codes(static_findings(late)) == ["track-running-stats-mismatch"]
    built = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    assert static_findings(built) == []


@pytest.mark.parametrize("bn", BN_KINDS)
def test_train_mode_during_eval_is_flagged_without_changing_the_model(bn):
    model = _net(bn).train()
    before = copy.deepcopy(model.state_dict())
    loader = TensorLoader(_images(40), torch.zeros(40), batch_size=16)
    findings = dynamic_findings(model, loader, phase="eval")
    assert _codes(findings) == ["bn-train-in-eval"] * 4
    assert "model.eval()" in findings[0].message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert dynamic_findings(model.eval(), loader, phase="eval") == []
    assert dynamic_findings(freeze_bn(model).train(), loader, phase="eval") == []


def test_single_value_per_channel_is_flagged_instead_of_raising():
    model = _net()
    ones = TensorLoader(_images(3), torch.zeros(3), batch_size=1)
    findings = dynamic_findings(model, ones, phase="train")
    assert _codes(findings) == ["single-value-per-channel"] * 2
    assert [f.layer for f in findings] == ["10", "loader"]  # 10: the first BatchNorm1d
    assert "every batch" in findings[1].message
    assert dynamic_findings(model.eval(), ones, phase="train") == []


def test_last_batch_of_one_is_predicted_from_the_loader():
    model = _net()
    x, y = _images(33), torch.zeros(33)
    findings = dynamic_findings(model, TensorLoader(x, y, batch_size=16), phase="train")
    assert [f.layer for f in findings] == ["loader"] and "drop_last=True" in findings[0].message
    dataset = TensorDataset(x, y)
    assert diagnose(mlp(bn=None), DataLoader(dataset, batch_size=16), phase="train") == []
    assert dynamic_findings(model, DataLoader(dataset, 16, drop_last=True), phase="train") == []
    assert dynamic_findings(model, DataLoader(dataset, 11), phase="train") == []


def test_check_warns_once_per_finding_and_phase_is_validated():
    model = modules.BatchNorm1d(4)
    with pytest.warns(PitfallWarning, match="bn-train-in-eval"):
        found = check(nn.Sequential(model), [torch.randn(8, 4)], phase="eval")
    assert len(found) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(nn.Sequential(model).eval(), [torch.randn(8, 4)]) == []
    with pytest.raises(ValueError, match="phase"):
        diagnose(nn.Sequential(model), [torch.randn(8, 4)], phase="test")
