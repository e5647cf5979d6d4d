"""Tests for bnlab.teaching.doctor: the train/eval pitfall detector."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import BN_KINDS, bn_lenet, codes, images
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlab.experiments.data import TensorLoader
from bnlab.experiments.models import lenet, mlp
from bnlab.inference.freeze import freeze_bn
from bnlab.nn import modules
from bnlab.nn.hooks import batchnorm_layers
from bnlab.teaching.doctor import PitfallWarning, diagnose, dynamic_findings, static_findings, warn

# ------------------------------------------------------------------------------ detector


def test_static_findings_trigger_and_silence():
    bad = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.BatchNorm1d(8))
    bad.add_module("3", nn.Linear(8, 8, bias=True))
    bad.add_module("4", nn.BatchNorm1d(8))
    findings = static_findings(bad)
    assert codes(findings) == ["bias-before-bn", "bn-after-dropout"]
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
    assert codes(static_findings(lenet(bn="bnlab"))) == ["bias-before-bn"] * 4


def test_track_running_stats_set_late_is_flagged():
    late = nn.Sequential(nn.BatchNorm1d(3))
    late[0].track_running_stats = False
    assert codes(static_findings(late)) == ["track-running-stats-mismatch"]
    built = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    assert static_findings(built) == []


@pytest.mark.parametrize("bn", BN_KINDS)
def test_train_mode_during_eval_is_flagged_without_changing_the_model(bn):
    model = bn_lenet(bn).train()
    before = copy.deepcopy(model.state_dict())
    loader = TensorLoader(images(40), torch.zeros(40), batch_size=16)
    findings = dynamic_findings(model, loader, phase="eval")
    assert codes(findings) == ["bn-train-in-eval"] * 4
    assert "model.eval()" in findings[0].message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert dynamic_findings(model.eval(), loader, phase="eval") == []
    assert dynamic_findings(freeze_bn(model).train(), loader, phase="eval") == []


def test_single_value_per_channel_is_flagged_instead_of_raising():
    model = bn_lenet()
    ones = TensorLoader(images(3), torch.zeros(3), batch_size=1)
    findings = dynamic_findings(model, ones, phase="train")
    assert codes(findings) == ["single-value-per-channel"] * 2
    assert [f.layer for f in findings] == ["10", "loader"]  # 10: the first BatchNorm1d
    assert "every batch" in findings[1].message
    assert dynamic_findings(model.eval(), ones, phase="train") == []


def test_last_batch_of_one_is_predicted_from_the_loader():
    model = bn_lenet()
    x, y = images(33), torch.zeros(33)
    findings = dynamic_findings(model, TensorLoader(x, y, batch_size=16), phase="train")
    assert [f.layer for f in findings] == ["loader"] and "drop_last=True" in findings[0].message
    dataset = TensorDataset(x, y)
    assert diagnose(mlp(bn=None), DataLoader(dataset, batch_size=16), phase="train") == []
    assert dynamic_findings(model, DataLoader(dataset, 16, drop_last=True), phase="train") == []
    assert dynamic_findings(model, DataLoader(dataset, 11), phase="train") == []


def test_check_warns_once_per_finding_and_phase_is_validated():
    model = modules.BatchNorm1d(4)
    with pytest.warns(PitfallWarning, match="bn-train-in-eval"):
        found = warn(nn.Sequential(model), [torch.randn(8, 4)], phase="eval")
    assert len(found) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn(nn.Sequential(model).eval(), [torch.randn(8, 4)]) == []
    with pytest.raises(ValueError, match="phase"):
        diagnose(nn.Sequential(model), [torch.randn(8, 4)], phase="test")


# ------------------------------------------------------------------ silent corruption: NaN, inf


def _poisoned_images(n: int, bad: float = float("nan")) -> torch.Tensor:
    x = images(n)
    x[3, 0, 10, 10] = bad  # one pixel of one image
    return x


@pytest.mark.parametrize("bn", BN_KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_running_statistics_poisoned_by_one_batch_are_reported(bn, bad):
    """One pixel is enough: torch (and bnlab) carry it into every later layer's statistics."""
    model = bn_lenet(bn).train()
    with torch.no_grad():
        model(images(16))
        model(_poisoned_images(16, bad))
        model(images(16))  # later clean batches do not wash it out: momentum keeps a share
    found = [f for f in static_findings(model) if f.code == "non-finite-running-stats"]
    layers = [name for name, _ in batchnorm_layers(model)]
    assert [f.layer for f in found] == layers
    assert "NaN" in found[0].message and "6 of 6 channels" in found[0].message
    assert "watch" in found[0].message and "recalibrate_bn" in found[0].message
    clean = bn_lenet(bn).train()
    with torch.no_grad():
        clean(images(16))
    assert "non-finite-running-stats" not in codes(static_findings(clean))


@pytest.mark.parametrize("bn", BN_KINDS)
def test_non_finite_input_is_traced_to_its_layer_and_batch_and_changes_nothing(bn):
    model = bn_lenet(bn).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.cat([images(16), _poisoned_images(16), images(16)])
    loader = TensorLoader(x, torch.zeros(48), batch_size=16)
    found = dynamic_findings(model, loader, phase="train", max_batches=3)
    layers = [name for name, _ in batchnorm_layers(model)]
    assert [(f.code, f.layer) for f in found] == [("non-finite-input", layers[0])]
    message = found[0].message
    assert "batch 1 " in message and "150 NaN and 0 inf" in message, message  # 5x5 x 6 channels
    assert all(f"'{name}'" in message for name in layers)  # every statistic it poisoned
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert dynamic_findings(model.eval(), loader, phase="eval", max_batches=3) == []


def test_watch_names_the_training_batch_that_poisoned_the_statistics():
    from bnlab.teaching.doctor import watch

    model = bn_lenet("bnlab").train()
    batches = [images(16, seed=s) for s in range(4)]
    batches[2] = _poisoned_images(16)
    with watch(model) as found:
        for x in batches:  # plain SGD steps: the NaN batch's gradients reach the weights too
            model.zero_grad()
            model(x).sum().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    assert [(f.code, f.layer) for f in found] == [("non-finite-input", "1")]
    assert "batch 2 " in found[0].message
    model(images(16))  # after the block, nothing is watched any more
    assert len(found) == 1
