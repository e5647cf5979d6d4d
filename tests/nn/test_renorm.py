"""bnlab.nn.renorm: Batch Renormalization against BN, its clamps, gradients and buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d, set_limits

PAIRS = {2: (BatchRenorm1d, nn.BatchNorm1d), 3: (BatchRenorm1d, nn.BatchNorm1d)}
PAIRS[4] = (BatchRenorm2d, nn.BatchNorm2d)
SHAPES = [(8, 3), (5, 4, 7), (4, 3, 5, 6)]
TOL = dict(atol=1e-6, rtol=1e-6)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(shape, dtype=torch.float64, seed=0, **kwargs):
    """A renorm layer with random gamma, beta and running statistics, and torch's BN with the
    same gamma, beta and momentum."""
    ours_cls, torch_cls = PAIRS[len(shape)]
    c = shape[1]
    ours = ours_cls(c, **kwargs).to(dtype)
    ref = torch_cls(c, momentum=ours.momentum, eps=ours.eps).to(dtype)
    g = gen(seed)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.rand(c, generator=gen(seed + 1), dtype=dtype) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen(seed + 2), dtype=dtype))
        ours.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
        ours.running_var.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
        ref.running_mean.copy_(ours.running_mean)
        ref.running_var.copy_(ours.running_var)
    return ours, ref


def batch(shape, dtype=torch.float64, seed=3, scale=3.0, shift=1.5):
    return torch.randn(shape, generator=gen(seed), dtype=dtype) * scale + shift


def forward_backward(module, x, dout):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    (out * dout).sum().backward()
    return out, x.grad, module.weight.grad, module.bias.grad


def channel_stats(x):
    dims = (0, *range(2, x.dim()))
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def per_channel(v, x):
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


@pytest.mark.parametrize("shape", SHAPES)
def test_r_max_1_d_max_0_is_batch_norm_outputs_gradients_and_buffers(shape):
    ours, ref = make(shape, r_max=1.0, d_max=0.0, momentum=0.1)
    for step in range(3):  # several steps: running statistics move apart from 0 / 1
        x, dout = batch(shape, seed=10 + step), batch(shape, seed=20 + step, shift=0.0)
        for a, b in zip(
            forward_backward(ours, x, dout), forward_backward(ref, x, dout), strict=True
        ):
            torch.testing.assert_close(a, b, **TOL)
        for m in (ours, ref):
            m.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3


@pytest.mark.parametrize("shape", SHAPES)
def test_unclamped_training_output_is_the_running_statistics_normalization(shape):
    # Running statistics equal to the population's: the batch's own statistics differ, but
    # with r and d free, (x - mu_B) / sigma_B * r + d = (x - mu) / sigma: eval mode's output.
    ours, _ = make(shape, r_max=1e6, d_max=1e6)
    c = shape[1]
    mu, sd = torch.linspace(-2, 2, c, dtype=torch.float64), torch.linspace(0.5, 3, c)
    with torch.no_grad():
        ours.running_mean.copy_(mu)
        ours.running_var.copy_(sd.double() ** 2 - ours.eps)  # sigma = sqrt(var + eps) = sd
    x = torch.randn(shape, generator=gen(5), dtype=torch.float64)
    x = x * per_channel(sd.double(), x) + per_channel(mu, x)
    mean_b, var_b = channel_stats(x)
    assert (mean_b - mu).abs().max() > 1e-3 and (var_b.sqrt() - sd).abs().max() > 1e-3
    expected = ours.eval()(x)
    torch.testing.assert_close(ours.train()(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_r_and_d_clamp_when_the_batch_is_far_from_the_running_statistics(direction):
    shape = (16, 3, 4, 4)
    ours = BatchRenorm2d(3, r_max=2.0, d_max=0.5, affine=False).double()
    with torch.no_grad():
        ours.running_mean.zero_()
        ours.running_var.fill_(1.0 - ours.eps)  # sigma = 1
    # std 10 (r would be 10 > r_max) or 0.1 (r would be 0.1 < 1 / r_max); mean +-5 (|d| > d_max)
    scale = 10.0 if direction > 0 else 0.1
    x = batch(shape, scale=scale, shift=5.0 * direction)
    mean_b, var_b = channel_stats(x)
    x_hat_bn = (x - per_channel(mean_b, x)) / per_channel(torch.sqrt(var_b + ours.eps), x)
    r = 2.0 if direction > 0 else 0.5
    expected = x_hat_bn * r + 0.5 * direction
    torch.testing.assert_close(ours(x), expected, atol=1e-12, rtol=1e-12)


def test_gradients_treat_r_and_d_as_constants():
    # Unclamped r, d: y = gamma * (r * x_hat_BN + d) + beta with r, d constants, so dx is
    # BN's backward with gamma * r, dgamma = sum(dout * (r x_hat_BN + d)), dbeta = sum(dout).
    shape = (6, 3, 4, 5)
    ours, ref = make(shape, r_max=100.0, d_max=100.0)
    x, dout = batch(shape), batch(shape, seed=7, shift=0.0)
    mean_b, var_b = channel_stats(x)
    std, std_b = torch.sqrt(ours.running_var + ours.eps), torch.sqrt(var_b + ours.eps)
    r, d = std_b / std, (mean_b - ours.running_mean) / std
    assert (r - 1).abs().min() > 1e-2 and d.abs().min() > 1e-2  # far from BN's r = 1, d = 0
    _, dx, dgamma, dbeta = forward_backward(ours, x, dout)
    with torch.no_grad():
        ref.weight.mul_(r)
    _, dx_ref, _, _ = forward_backward(ref, x, dout)
    torch.testing.assert_close(dx, dx_ref, atol=1e-10, rtol=1e-10)
    x_hat = (x - per_channel(mean_b, x)) / per_channel(std_b, x)
    renormalized = x_hat * per_channel(r, x) + per_channel(d, x)
    torch.testing.assert_close(dgamma, (dout * renormalized).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(dbeta, dout.sum(dim=(0, 2, 3)))


def test_gradcheck_with_clamped_r_and_d():
    # Clamped r and d are constant in x locally, so finite differences see what autograd does.
    shape = (5, 2, 3)
    layer = BatchRenorm1d(2, momentum=0.0, r_max=1.5, d_max=0.5).double()
    with torch.no_grad():
        layer.running_var.fill_(100.0)  # sigma_B / sigma ~ 0.3 < 1 / r_max
        layer.running_mean.fill_(-20.0)  # (mu_B - mu) / sigma ~ 2 > d_max
    x = batch(shape).requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert layer.running_mean.eq(-20.0).all()  # momentum 0: the clamps stayed put


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_mode_is_batch_norm_with_the_running_statistics_and_changes_nothing(shape):
    ours, ref = make(shape)
    ours.eval()
    ref.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x, dout = batch(shape), batch(shape, seed=9, shift=0.0)
    for a, b in zip(forward_backward(ours, x, dout), forward_backward(ref, x, dout), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    single = ours(x[:1])  # a batch of one is fine in eval mode
    assert single.shape == (1, *shape[1:])


def test_running_statistics_update_pytorch_momentum_and_unbiased_variance():
    shape = (4, 3, 5, 5)
    layer = BatchRenorm2d(3, momentum=0.25).double()
    x = batch(shape)
    mean_b, var_b = channel_stats(x)
    m = x.numel() // 3
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.75 * 0.0 + 0.25 * mean_b)
    torch.testing.assert_close(layer.running_var, 0.75 * 1.0 + 0.25 * var_b * m / (m - 1))
    assert layer.num_batches_tracked.item() == 1


def test_schedule_relaxes_r_max_and_d_max_between_steps():
    layer = BatchRenorm1d(3, momentum=0.0, r_max=1.0, d_max=0.0)
    with torch.no_grad():
        layer.running_mean.fill_(2.0)
    x = torch.randn(16, 3, generator=gen())
    bn = nn.BatchNorm1d(3, momentum=0.0)
    torch.testing.assert_close(layer(x), bn(x))
    layer.r_max, layer.d_max = 3.0, 5.0
    assert (layer(x) - bn(x)).abs().max() > 0.5  # d now shifts by about -2


def test_state_dict_and_repr():
    layer = BatchRenorm2d(4)
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    assert "r_max=3.0, d_max=5.0" in repr(layer)
    assert layer.momentum == 0.01 and layer.eps == 1e-5
    plain = BatchRenorm1d(4, affine=False)
    assert plain.weight is None and not list(plain.parameters())
    assert plain(torch.randn(5, 4)).shape == (5, 4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_features=0), "num_features"),
        (dict(num_features=2.0), "num_features"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-5), "eps"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=None), "momentum"),
        (dict(r_max=0.5), "r_max"),
        (dict(r_max=float("inf")), "r_max"),
        (dict(d_max=-1.0), "d_max"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        BatchRenorm1d(**kwargs)


@pytest.mark.parametrize(
    "cls, shape, match",
    [
        (BatchRenorm1d, (4, 3, 2, 2), "2D or 3D"),
        (BatchRenorm1d, (3,), "2D or 3D"),
        (BatchRenorm2d, (4, 3, 5), "4D"),
        (BatchRenorm2d, (4, 2, 5, 5), "channels"),
        (BatchRenorm1d, (1, 3), "more than 1 value"),
        (BatchRenorm2d, (0, 3, 2, 2), "empty"),
    ],
)
def test_bad_input_raises_before_any_state_changes(cls, shape, match):
    layer = cls(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_limits_set_after_construction_raise_before_any_state_changes():
    layer = BatchRenorm1d(3)
    layer.r_max = 0.5
    with pytest.raises(ValueError, match="r_max"):
        layer(torch.randn(4, 3))
    layer.r_max, layer.d_max = 2.0, -1.0
    with pytest.raises(ValueError, match="d_max"):
        layer(torch.randn(4, 3))
    assert layer.num_batches_tracked.item() == 0
    with pytest.raises(TypeError, match="floating"):
        layer.d_max = 1.0
        layer(torch.ones(4, 3, dtype=torch.long))


def test_set_limits_reaches_every_renorm_layer():
    model = nn.Sequential(BatchRenorm1d(3, r_max=1.0, d_max=0.0), nn.ReLU(), BatchRenorm1d(3))
    assert set_limits(model, 2.0, 4.0) == 2
    assert all((m.r_max, m.d_max) == (2.0, 4.0) for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="r_max"):
        set_limits(model, 0.5, 1.0)
