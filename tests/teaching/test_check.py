"""bnlab.teaching.check: the reference passes, each mistake is named, other wrong code fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import functional as F
from bnlab.nn import modules
from bnlab.teaching import check


def forward_with(dims=None, unbiased=False, eps_mode="inside", affine="both"):
    """A learner-style forward (returns out, cache) with one mistake chosen."""

    def fn(x, gamma, beta, eps):
        d = {None: F.reduce_dims(x), "all": tuple(range(x.dim()))}.get(dims, dims)
        mean = x.mean(dim=d, keepdim=True)
        var = x.var(dim=d, keepdim=True, unbiased=unbiased)
        std = {
            "inside": lambda: torch.sqrt(var + eps),
            "outside": lambda: torch.sqrt(var) + eps,
            "none": lambda: torch.sqrt(var),
            "1e-5": lambda: torch.sqrt(var + 1e-5),
        }[eps_mode]()
        g = 1.0 if affine == "beta only" else F.per_channel(gamma, x)
        b = 0.0 if affine == "gamma only" else F.per_channel(beta, x)
        return g * (x - mean) / std + b, None

    return fn


FORWARD_MISTAKES = {
    check.UNBIASED_VARIANCE: forward_with(unbiased=True),
    check.AXES_BATCH_ONLY: forward_with(dims=(0,)),
    check.AXES_ALL: forward_with(dims="all"),
    check.AXES_PER_SAMPLE: forward_with(dims=(2, 3)),
    check.EPS_OUTSIDE_SQRT: forward_with(eps_mode="outside"),
    check.EPS_MISSING: forward_with(eps_mode="none"),
    check.EPS_HARD_CODED: forward_with(eps_mode="1e-5"),
    check.GAMMA_MISSING: forward_with(affine="beta only"),
    check.BETA_MISSING: forward_with(affine="gamma only"),
}


def test_reference_forward_passes():
    for ndim in (2, 4):
        result = check.check_forward(F.batchnorm_forward, ndim=ndim)
        assert result.passed and result.mistake is None
        assert result.max_abs_diff < 1e-12


def test_torch_batch_norm_passes_as_a_learner_forward():
    def fn(x, gamma, beta, eps):
        return torch.nn.functional.batch_norm(x, None, None, gamma, beta, True, 0.1, eps)

    assert check.check_forward(fn).passed


def test_learner_forward_without_mistakes_passes():
    assert check.check_forward(forward_with()).passed


@pytest.mark.parametrize("mistake", list(FORWARD_MISTAKES))
def test_each_forward_mistake_is_named(mistake):
    result = check.check_forward(FORWARD_MISTAKES[mistake])
    assert not result.passed
    assert result.mistake == mistake, result
    assert result.max_abs_diff > 1e-3  # the input makes every mistake clearly visible
    assert "Hint" in result.message and mistake in repr(result)


@pytest.mark.parametrize(
    "mistake", [check.UNBIASED_VARIANCE, check.EPS_OUTSIDE_SQRT, check.AXES_ALL]
)
def test_forward_mistakes_on_2d_input(mistake):
    assert check.check_forward(FORWARD_MISTAKES[mistake], ndim=2).mistake == mistake


def test_random_wrong_forward_is_a_generic_failure():
    result = check.check_forward(lambda x, gamma, beta, eps: torch.tanh(x) * 2 + 0.1)
    assert not result.passed and result.mistake is None
    assert "none of the typical mistakes" in result.message


def test_forward_that_raises_or_has_wrong_shape_fails_cleanly():
    def raises(x, gamma, beta, eps):
        raise RuntimeError("boom")

    result = check.check_forward(raises)
    assert not result.passed and "RuntimeError: boom" in result.message
    result = check.check_forward(lambda x, g, b, e: x.mean(dim=0))
    assert not result.passed and "shape" in result.message


def backward_variant(kind):
    def fn(dout, cache):
        xhat, g, _xmu, ivar, *_rest, dims = cache
        dgamma, dbeta = (dout * xhat).sum(dim=dims), dout.sum(dim=dims)
        mean_d = dout.mean(dim=dims, keepdim=True)
        mean_dx = (dout * xhat).mean(dim=dims, keepdim=True)
        dx = {
            "constants": dout,
            "no_mean": dout - xhat * mean_dx,
            "no_var": dout - mean_d,
        }[kind]
        return g * ivar * dx, dgamma, dbeta

    return fn


@pytest.mark.parametrize("backward", [F.batchnorm_backward_staged, F.batchnorm_backward_compact])
def test_reference_backwards_pass(backward):
    result = check.check_backward(backward)
    assert result.passed and result.max_abs_diff < 1e-10


@pytest.mark.parametrize(
    "kind, mistake",
    [
        ("constants", check.STATS_AS_CONSTANTS),
        ("no_mean", check.MISSING_MEAN_PATH),
        ("no_var", check.MISSING_VAR_PATH),
    ],
)
def test_each_backward_mistake_is_named(kind, mistake):
    result = check.check_backward(backward_variant(kind))
    assert not result.passed and result.mistake == mistake, result


def test_backward_with_wrong_dbeta_and_a_wrong_forward():
    def bad_dbeta(dout, cache):
        dx, dgamma, dbeta = F.batchnorm_backward_compact(dout, cache)
        return dx, dgamma, dbeta * 2

    result = check.check_backward(bad_dbeta)
    assert not result.passed and "dbeta" in result.message
    # A learner forward with a mistake is diagnosed before its backward is run.
    result = check.check_backward(F.batchnorm_backward_compact, forward=forward_with(unbiased=True))
    assert result.mistake == check.UNBIASED_VARIANCE and "forward" in result.message


def torch_style_step(x, running_mean, running_var, momentum):
    torch.nn.functional.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)


def step_variant(kind):
    def step(x, running_mean, running_var, momentum):
        mean, var = x.mean(0), x.var(0, unbiased=kind != "biased")
        if kind == "missing":
            return
        new_weight = {"keras": 1 - momentum, "overwrite": 1.0}.get(kind, momentum)
        running_mean.mul_(1 - new_weight).add_(new_weight * mean)
        running_var.mul_(1 - new_weight).add_(new_weight * var)

    return step


def test_reference_running_stats_pass():
    assert check.check_running_stats(torch_style_step).passed
    assert check.check_running_stats(step_variant("right")).passed
    for module in (modules.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3, momentum=0.3)):
        result = check.check_running_stats(module)
        assert result.passed, result


@pytest.mark.parametrize(
    "kind, mistake",
    [
        ("missing", check.MISSING_RUNNING_UPDATE),
        ("keras", check.KERAS_MOMENTUM),
        ("biased", check.BIASED_RUNNING_VAR),
        ("overwrite", check.RUNNING_OVERWRITTEN),
    ],
)
def test_each_running_stat_mistake_is_named(kind, mistake):
    result = check.check_running_stats(step_variant(kind))
    assert not result.passed and result.mistake == mistake, result


def test_module_without_update_is_diagnosed_and_left_untouched():
    class NoUpdate(nn.Module):
        def __init__(self):
            super().__init__()
            self.momentum = 0.1
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

        def forward(self, x):
            return (x - x.mean(0)) / x.std(0)

    assert check.check_running_stats(NoUpdate()).mistake == check.MISSING_RUNNING_UPDATE
    bn = nn.BatchNorm1d(3)
    check.check_running_stats(bn)
    assert bn.running_mean.abs().max() == 0  # the check worked on a copy


def test_random_wrong_step_and_bad_modules():
    def noisy(x, running_mean, running_var, momentum):
        running_mean.add_(1.0)

    result = check.check_running_stats(noisy)
    assert not result.passed and result.mistake is None
    with pytest.raises(ValueError, match="track_running_stats"):
        check.check_running_stats(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="momentum=None"):
        check.check_running_stats(nn.BatchNorm1d(3, momentum=None))
    with pytest.raises(ValueError, match="ndim"):
        check.check_forward(F.batchnorm_forward, ndim=3)


def test_the_2d_forward_names_per_sample_axes_too():
    """(N, C) input normalized per sample is layer norm: named, as for 4-D input."""
    assert check.check_forward(forward_with(dims=(1,)), ndim=2).mistake == check.AXES_PER_SAMPLE


def with_dparams(change):
    def fn(dout, cache):
        dx, dgamma, dbeta = F.batchnorm_backward_compact(dout, cache)
        return change(dout, cache, dx, dgamma, dbeta)

    return fn


@pytest.mark.parametrize(
    "change, mistake",
    [
        (lambda d, c, dx, dg, db: (dx, dg, db / (d.numel() / 3)), check.DPARAMS_AVERAGED),
        (lambda d, c, dx, dg, db: (dx, dg / (d.numel() / 3), db), check.DPARAMS_AVERAGED),
        (lambda d, c, dx, dg, db: (dx, db, db), check.DGAMMA_WITHOUT_XHAT),
        (lambda d, c, dx, dg, db: (dx, dg, d.sum(dim=0)), check.AXES_BATCH_ONLY),
        (lambda d, c, dx, dg, db: (dx / c[1], dg, db), check.GAMMA_MISSING),
    ],
)
def test_dgamma_dbeta_and_a_dropped_gamma_in_dx_are_named(change, mistake):
    result = check.check_backward(with_dparams(change))
    assert not result.passed and result.mistake == mistake, result


def test_the_fallbacks_of_the_backward_and_the_running_stats_name_their_own_section():
    """A wrong dbeta or running statistic is not sent to the forward's formula."""
    result = check.check_backward(with_dparams(lambda d, c, dx, dg, db: (dx, dg, db * 2 + 1)))
    assert result.mistake is None and "dbeta differs" in result.message
    assert "differs most at channel" in result.message and "batchnorm_forward" not in result.message

    def noisy(x, running_mean, running_var, momentum):
        torch_style_step(x, running_mean, running_var, momentum)
        running_var[2] += 0.5

    result = check.check_running_stats(noisy)
    assert result.mistake is None and "batchnorm_forward" not in result.message
    assert "running_var, channel 2" in result.message and check.RUNNING_SECTION in result.message


def test_rebinding_the_buffers_is_named_not_a_missing_update():
    def rebinds(x, running_mean, running_var, momentum):
        m = x.shape[0]
        running_mean = (1 - momentum) * running_mean + momentum * x.mean(0)
        running_var = (1 - momentum) * running_var + momentum * x.var(0) * m / (m - 1)
        return running_mean, running_var

    result = check.check_running_stats(rebinds)
    assert result.mistake == check.RUNNING_REBOUND and "in place" in result.message
    assert check.check_running_stats(step_variant("missing")).mistake == (
        check.MISSING_RUNNING_UPDATE
    )


def test_a_float32_forward_passes_and_a_float32_mistake_is_named():
    def forward32(x, gamma, beta, eps):
        return F.batchnorm_forward(x.float(), gamma.float(), beta.float(), eps)

    result = check.check_forward(forward32)
    assert result.passed and "float32" in result.message
    wrong = FORWARD_MISTAKES[check.UNBIASED_VARIANCE]
    result = check.check_forward(lambda x, g, b, e: wrong(x.float(), g.float(), b.float(), e))
    assert result.mistake == check.UNBIASED_VARIANCE
