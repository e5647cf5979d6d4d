"""The Numba CPU kernels against bnlab.nn.functional and torch: values, gradients, errors."""

import pytest
import torch

from bnlab.kernels import autograd as A
from bnlab.kernels import cpu as K
from bnlab.kernels import stability
from bnlab.nn import functional as F

SHAPES = [(3, 2, 5, 5), (7, 3), (4, 1, 3), (2, 3, 4, 3, 1)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_stats_and_forward_match_functional(shape, dtype):
    x, w, b, _ = _data(shape, dtype)
    mean, var, invstd = K.channel_stats(x, 1e-5)
    ref_mean, ref_var = F.batch_stats(x)
    torch.testing.assert_close(mean, ref_mean, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(var, ref_var, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(invstd, torch.rsqrt(ref_var + 1e-5), rtol=TOL[dtype], atol=0)
    y = K.normalize(x, mean, invstd, w, b)
    expected = F.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(y, expected, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_torch_autograd(shape, dtype):
    x, w, b, dy = _data(shape, dtype)
    grads = []
    for bn in (torch.nn.functional.batch_norm, A.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        bn(xs, None, None, ws, bs, True).backward(dy)
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_stats_train_and_eval_match_torch(dtype, momentum):
    ref = torch.nn.BatchNorm2d(2, momentum=momentum, dtype=dtype)
    mine = A.BatchNorm2d(2, momentum=momentum, dtype=dtype, backend="cpu")
    mine.load_state_dict(ref.state_dict())
    for seed in range(3):
        x, _, _, dy = _data((3, 2, 5, 5), dtype, seed)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(x1).backward(dy)
        mine(x2).backward(dy)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    ref.eval(), mine.eval()
    x, _, _, dy = _data((3, 2, 5, 5), dtype, 9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x1).backward(dy)
    mine(x2).backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)


def test_update_running_stats_matches_functional():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5])
    rm1, rv1 = torch.zeros(2), torch.ones(2)
    rm2, rv2 = rm1.clone(), rv1.clone()
    K.update_running_stats(rm1, rv1, mean, var, 10, 0.3)
    F.update_running_stats(rm2, rv2, mean, var, 10, 0.3)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    # by hand: momentum 0.3 on the new value, the unbiased variance (m = 10)
    assert rm1.tolist() == pytest.approx([0.3, -0.6])
    assert rv1.tolist() == pytest.approx([0.7 + 0.3 * 4.0 * 10 / 9, 0.7 + 0.3 * 0.5 * 10 / 9])
    with pytest.raises(ValueError, match=r"running_var must have shape \(2,\)"):
        K.update_running_stats(rm1, torch.ones(3), mean, var, 10, 0.3)


def test_welford_chan_is_stable_where_the_naive_formula_fails():
    x, exact = stability.shifted_data((8, 2, 16, 16), mean=1e4, std=1.0)
    _, var, _ = K.channel_stats(x)
    assert stability.relative_error(var, exact) < 1e-3
    assert stability.relative_error(stability.naive_variance(x), exact) > 1e-2
    x2d, exact2d = stability.shifted_data((500, 3), mean=1e4, std=1.0)  # the HW == 1 path
    assert stability.relative_error(K.channel_stats(x2d)[1], exact2d) < 1e-3


def test_bad_inputs_raise_clear_errors():
    x, w, b, dy = _data((3, 2, 5, 5), torch.float32)
    mean, var, invstd = K.channel_stats(x)
    with pytest.raises(ValueError, match="contiguous"):
        K.channel_stats(x.transpose(2, 3))
    with pytest.raises(TypeError, match="float32 and float64"):
        K.channel_stats(x.half())
    with pytest.raises(TypeError, match="torch.Tensor"):
        K.channel_stats(x.numpy())
    with pytest.raises(ValueError, match=r"input is on meta.*call \.cpu\(\) first"):
        K.channel_stats(x.to("meta"))
    with pytest.raises(ValueError, match=r"input is on meta.*call \.cpu\(\) first"):
        K.backward_elementwise(dy, x.to("meta"), mean, invstd, w, mean, mean, 75)
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
        K.normalize(x, mean, invstd, torch.ones(3), b)
    with pytest.raises(TypeError, match="bias is torch.float64"):
        K.normalize(x, mean, invstd, w, b.double())
    with pytest.raises(ValueError, match="grad_output must match"):
        K.backward_reduce(dy[:2], x, mean, invstd)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        K.channel_stats(torch.randn(1, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        A.batch_norm(x, None, None, training=True, backend="tpu")
