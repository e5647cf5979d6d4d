"""The Numba CPU kernels against bnlab.nn.functional and torch: values, gradients, errors."""

import pytest
import torch

from bnlab.kernels import autograd as A
from bnlab.kernels import cpu as K
from bnlab.kernels import stability
from bnlab.kernels import validate as V
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


def test_quick_argument_checks_let_through_only_what_the_full_checks_accept():
    """The fused kernels' arguments are checked by a quick path first; wherever the full
    checks would raise, the quick path must hand over to them (None), so every message
    above still comes; where it answers, it gives the full checks' shape."""
    x, w, b, dy = _data((3, 2, 5, 5), torch.float32)
    _, mean, invstd = K.forward_train(x, w, b, None, None, 0.1, 1e-5)
    vectors = {"weight": w, "bias": b, "running_mean": w, "running_var": w}
    full = V.validate_forward_args(x, 1e-5, K._DEVICE, True, **vectors)
    assert V._forward_args_pass(x, 1e-5, "cpu", True, vectors.values()) == full == (3, 2, 25)
    assert V._backward_args_pass(dy, x, mean, invstd, w, "cpu") == (3, 2, 25)
    refused = [  # (x, eps, training, vectors): each one fails the full forward checks
        (x.transpose(2, 3), 1e-5, True, vectors),
        (x.half(), 1e-5, True, {}),
        (x.double(), 1e-5, True, vectors),
        (x, 0.0, True, vectors),
        (x, float("nan"), True, vectors),
        (torch.randn(1, 2), 1e-5, True, {}),
        (x, 1e-5, True, {**vectors, "weight": torch.ones(3)}),
        (x, 1e-5, True, {**vectors, "bias": torch.ones(4)[::2]}),
        (x, 1e-5, False, {**vectors, "running_var": w.double()}),
        (x.to("meta"), 1e-5, True, {}),
    ]
    for xi, eps, training, vec in refused:
        assert V._forward_args_pass(xi, eps, "cpu", training, vec.values()) is None
        with pytest.raises((TypeError, ValueError)):
            V.validate_forward_args(xi, eps, K._DEVICE, training, **vec)
    backward_refused = [  # (dy, x, mean, invstd, weight)
        (dy[:2], x, mean, invstd, w),
        (dy.double(), x, mean, invstd, w),
        (dy.transpose(2, 3), x, mean, invstd, w),
        (dy, x, mean[:1], invstd, w),
        (dy, x, mean, invstd.long(), w),
        (dy, x, mean, invstd, w.double()),
    ]
    for args in backward_refused:
        assert V._backward_args_pass(*args, "cpu") is None
        with pytest.raises((TypeError, ValueError)):
            V.validate_backward_args(*args, K._DEVICE)


# --- the channel-blocked kernels: exactness, group sizes, serial and parallel builds


def test_constant_channel_comes_out_exactly_beta():
    """(x - mean) * scale + beta: a constant channel far from zero gives beta itself. The
    fused x * scale + (beta - mean * scale) cancels there (0.39 away from beta at -1e4)."""
    x = torch.full((4, 3, 6, 6), -1e4)
    x[:, 1] = 3.0  # a channel near zero, and one with spread, beside the constant one
    x[:, 2] = torch.randn(4, 6, 6) + 1e4
    beta = torch.tensor([-0.5, 0.25, 0.0])
    for rows in (x, x.permute(0, 2, 3, 1).reshape(-1, 3)):  # NCHW, and the channels_last rows
        y, mean, _ = K.forward_train(rows, torch.ones(3), beta, None, None, 0.1, 1e-5)
        assert mean[0].item() == -1e4
        assert (y[:, 0] - beta[0]).abs().max().item() <= 1e-6
        assert (y[:, 1] - beta[1]).abs().max().item() <= 1e-6
    # the fused form on the same channel, its constants in float64 and then rounded to float32
    scale = 1.0 / torch.sqrt(x[:, 0].double().var(unbiased=False) + 1e-5)
    shift = beta[0].double() - x[:, 0].double().mean() * scale
    fused = x[:, 0] * scale.float() + shift.float()
    assert (fused - beta[0]).abs().max().item() > 0.1


@pytest.mark.parametrize("shape", [(5, 7, 3, 4), (6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_sizes_and_serial_or_parallel_builds_give_the_same_numbers(monkeypatch, shape, dtype):
    """Forced plans: 1 channel per group, 3 (C = 7 is not a multiple), all channels in one
    group split over the batch, and the serial build; each against torch, and the plans
    that sum in the same order bit for bit against each other."""
    x, w, b, dy = _data(shape, dtype, seed=3)
    rm0, rv0 = torch.randn(shape[1], dtype=dtype), torch.rand(shape[1], dtype=dtype) + 0.5
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    rm_t, rv_t = rm0.clone(), rv0.clone()
    torch.nn.functional.batch_norm(xs, rm_t, rv_t, ws, bs, True, 0.1, 1e-5).backward(dy)
    want = (xs.grad, ws.grad, bs.grad)
    results = {}
    for plan in [(False, 1, 1), (True, 1, 1), (True, 3, 1), (True, shape[1], 2), (True, 2, 3)]:
        monkeypatch.setattr(K, "FORCE_PLAN", plan)
        rm, rv = rm0.clone(), rv0.clone()
        y, mean, invstd = K.forward_train(x, w, b, rm, rv, 0.1, 1e-5)
        grads = K.backward_train(dy, x, mean, invstd, w)
        results[plan] = (y, rm, rv, *grads)
        ref = torch.nn.functional.batch_norm(x, rm0.clone(), rv0.clone(), w, b, True, 0.1, 1e-5)
        torch.testing.assert_close(y, ref, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(rm, rm_t, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(rv, rv_t, rtol=TOL[dtype], atol=TOL[dtype])
        for got, exp in zip(grads, want, strict=True):
            torch.testing.assert_close(got, exp, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])
    if len(shape) == 4:  # unsplit plans sum every channel in the same order: identical results
        for plan in [(True, 1, 1), (True, 3, 1)]:
            for got, exp in zip(results[plan], results[(False, 1, 1)], strict=True):
                assert torch.equal(got, exp), plan


def test_the_plan_blocks_channels_by_the_cache_and_goes_serial_when_small():
    caches = K.cache_sizes()
    assert caches.l2 > 0 and caches.llc >= caches.l2
    small_l2 = caches._replace(l2=1 << 20)
    # 64 KiB per channel: 8 channels fill half of a 1 MiB L2; never more than C / threads
    assert K.channel_group(16, 64, 1024, 4, 1, 1, small_l2) == 8
    assert K.channel_group(16, 64, 1024, 4, 2, 1, small_l2) == 4  # x and dy
    assert K.channel_group(16, 64, 1024, 4, 1, 32, small_l2) == 2
    assert K.channel_group(1024, 4, 1024, 4, 1, 1, small_l2) == 1  # 4 MiB channels: one each
    assert K.plan(2, 3, 4, 4, 1, 2)[0] is False  # 24 values: serial
    parallel, group, splits = K.plan(64, 1, 4096, 4, 1, 2)  # one channel: split over the batch
    assert parallel and group == 1 and splits == 2
    assert K.threading_layer() in ("omp", "tbb", "workqueue")
