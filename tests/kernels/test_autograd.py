"""bnlab.kernels.autograd: the kernel-backed modules against torch.nn, and what they refuse."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch_samples import assert_sample_matches_torch, samples

from bnlab.kernels import autograd as A

MODULE_DB = [s for name in ("BatchNorm1d", "BatchNorm2d") for s in samples(name)]


@pytest.mark.parametrize(
    "sid, args, kwargs, fargs, training", MODULE_DB, ids=[s[0] for s in MODULE_DB]
)
def test_module_db_samples_match_torch_on_the_cpu_kernels(sid, args, kwargs, fargs, training):
    assert_sample_matches_torch(
        lambda name: partial(getattr(A, name), backend="cpu"), sid, args, kwargs, fargs, training
    )


def test_channels_last_in_channels_last_out_with_torchs_values():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    ours, ref = A.BatchNorm2d(3, backend="cpu"), nn.BatchNorm2d(3)
    y_o, y_r = ours(x), ref(x)
    assert y_o.is_contiguous(memory_format=torch.channels_last)
    assert y_r.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_o, y_r)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_first_order_gradients_work_and_higher_orders_are_refused_clearly():
    m = A.BatchNorm2d(3, backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x)
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="higher-order gradients.*bnlab.modules.BatchNorm1d/2d"):
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_is_refused_clearly():
    from torch.func import jvp

    m = A.BatchNorm2d(3, backend="cpu").eval()
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="no forward-mode derivative.*bnlab.modules"):
        jvp(m, (x,), (torch.ones_like(x),))


def test_forward_mode_is_refused_even_when_nothing_requires_a_gradient():
    """No parameter requires a gradient: without the check the tangent would come out as
    zeros, silently. Refused before the module counts the batch."""
    import torch.autograd.forward_ad as fwAD

    m = A.BatchNorm2d(3, affine=False, backend="cpu")
    x = torch.randn(4, 3, 2, 2)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        for call in (m, lambda t: A.batch_norm(t, None, None, training=True)):
            with pytest.raises(RuntimeError, match="no forward-mode derivative"):
                call(dual)
        with torch.no_grad(), pytest.raises(RuntimeError, match="no forward-mode derivative"):
            A.batch_norm_relu(dual, m.running_mean, m.running_var)
    assert m.num_batches_tracked.item() == 0


def test_torch_func_transforms_are_refused_clearly():
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*torch.autograd.grad"):
        torch.func.grad(lambda t: A.batch_norm(t, None, None, training=True).pow(3).sum())(x)


def test_cumulative_average_matches_torch_and_a_refused_batch_is_not_counted():
    """momentum=None: the kernels read 1 / num_batches_tracked themselves (see ops)."""
    torch.manual_seed(0)
    ours, ref = A.BatchNorm2d(3, momentum=None, backend="cpu"), nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3, 1, 1))
    assert ours.num_batches_tracked.item() == 3


from helpers import PROPERTY_SETTINGS, deep_only  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@PROPERTY_SETTINGS
@given(
    st.sampled_from([2, 3, 4]),
    st.integers(0, 5),
    st.integers(1, 4),
    st.lists(st.integers(0, 3), min_size=2, max_size=2),
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
    st.lists(st.booleans(), min_size=1, max_size=3),
    st.integers(0, 2**16),
)
def test_cpu_kernel_modules_match_torch_on_random_inputs(
    rank, n, c, spatial, dtype, cl, modes, seed
):
    name = "BatchNorm2d" if rank == 4 else "BatchNorm1d"
    shape = (n, c, *spatial[: rank - 2])
    ours, ref = getattr(A, name)(c, backend="cpu", dtype=dtype), getattr(nn, name)(c, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    g = torch.Generator().manual_seed(seed)
    for training in modes:
        x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
        if cl and rank == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        results = []
        for m in (ours, ref):
            xi = x.clone().requires_grad_()
            try:
                y = m.train(training)(xi)
            except ValueError:
                results.append(None)
                continue
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xi.grad))
        if results[1] is None:  # torch refused (one value per channel): so must bnlab
            assert results[0] is None
            break  # torch has counted the refused batch; bnlab has not (by design)
        torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=tol * 10, atol=tol * 10)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=tol, atol=tol)


# --- the fused kernel paths, on the CPU kernels and on the CUDA simulator (or a
# GPU): channels_last without a copy, eval BN fused with ReLU, the 2-D (N, C) case.

import torch.nn.functional as TF  # noqa: E402

from bnlab.kernels import backend  # noqa: E402

backend.cuda_module()  # the simulator unless a GPU is present, chosen before bnlab.kernels.cuda
from bnlab.kernels import cuda as KC  # noqa: E402

DEV = {"cpu": "cpu", "cuda": "cpu" if KC.SIMULATOR else "cuda"}
TOL = {torch.float32: 3e-5, torch.float64: 1e-10}
# (shape, memory format): 2-D, 3-D, 4-D both layouts, 5-D channels_last_3d; sizes not
# multiples of the chunk counts, the 8-row blocks or the simulator's 32-thread blocks
CASES = [
    ((7, 3), torch.contiguous_format),
    ((13, 5), torch.contiguous_format),
    ((3, 2, 5), torch.contiguous_format),
    ((3, 2, 5, 5), torch.contiguous_format),
    ((3, 4, 5, 3), torch.channels_last),
    ((2, 3, 2, 3, 2), torch.channels_last_3d),
]
# On the CUDA simulator (seconds per case) make test runs the two layouts the autograd layer
# reshapes (2-D rows, channels_last) in float64; make test-deep runs every case.
SIM_CASES = {0, 4}  # the 2-D rows and channels_last, float64


def _be_cases(dtypes=(torch.float32, torch.float64)):
    """(backend, dtype, shape, memory format) parameters: every CPU case, the simulator's
    representative ones, the rest of the simulator's in make test-deep."""
    out = []
    for dtype in dtypes:
        for i, (shape, fmt) in enumerate(CASES):
            out.append(pytest.param("cpu", dtype, shape, fmt))
            marks = () if i in SIM_CASES and dtype == torch.float64 else (deep_only,)
            out.append(pytest.param("cuda", dtype, shape, fmt, marks=marks))
    return out


def _path_data(shape, fmt, dtype, device, seed=0, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset
    c = shape[1]
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g) + 0.5
    out = [t.to(dtype=dtype, device=device) for t in (x, w, b, dy, rm, rv.double())]
    out[0] = out[0].contiguous(memory_format=fmt)
    out[3] = out[3].contiguous(memory_format=fmt)
    return out


@pytest.mark.parametrize("be, dtype, shape, fmt", _be_cases())
def test_training_forward_backward_and_running_stats_match_torch(be, dtype, shape, fmt):
    x, w, b, dy, rm, rv = _path_data(shape, fmt, dtype, DEV[be])
    results = []
    for bn in (TF.batch_norm, lambda *a: A.batch_norm(*a, backend=be)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        xs = x.clone().requires_grad_()  # clone keeps the memory format
        r_m, r_v = rm.clone(), rv.clone()
        y = bn(xs, r_m, r_v, ws, bs, True, 0.1, 1e-5)
        y.backward(dy)
        results.append((y, xs.grad, ws.grad, bs.grad, r_m, r_v))
    (y_t, *rest_t), (y_k, *rest_k) = results
    assert y_k.stride() == y_t.stride()  # the output keeps the input's memory format
    tol = TOL[dtype]
    torch.testing.assert_close(y_k, y_t, rtol=tol, atol=tol)
    for got, want in zip(rest_k, rest_t, strict=True):
        torch.testing.assert_close(got, want, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("be, dtype, shape, fmt", _be_cases())
def test_eval_bn_relu_in_one_pass_equals_batch_norm_then_relu(be, dtype, shape, fmt):
    x, w, b, _, rm, rv = _path_data(shape, fmt, dtype, DEV[be], offset=0.0)
    want = torch.relu(TF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
    with torch.no_grad():
        got = A.batch_norm_relu(x, rm, rv, w, b, 1e-5, backend=be)
    assert got.stride() == want.stride()
    assert (got == 0).any() and (got > 0).any()  # both sides of the ReLU are exercised
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    no_affine = torch.relu(TF.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-3))
    with torch.no_grad():
        got = A.batch_norm_relu(x, rm, rv, eps=1e-3, backend=be)
    torch.testing.assert_close(got, no_affine, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("be, dtype, shape, fmt", _be_cases((torch.float64,)))
def test_eval_mode_gradients_match_torch(be, dtype, shape, fmt):
    x, w, b, dy, rm, rv = _path_data(shape, fmt, torch.float64, DEV[be])
    grads = []
    for bn in (TF.batch_norm, lambda *a: A.batch_norm(*a, backend=be)):
        xs = x.clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        bn(xs, rm, rv, ws, bs, False, 0.1, 1e-5).backward(dy)
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bn_relu_refuses_inputs_that_need_a_gradient_before_computing():
    x = torch.randn(4, 3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"torch.no_grad\(\).*batch_norm followed by torch.relu"):
        A.batch_norm_relu(x, rm, rv)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference kernel"):
        A.batch_norm_relu(x.detach(), rm, rv, w)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        A.batch_norm_relu(x.detach(), None, None)
    with torch.no_grad():
        empty = A.batch_norm_relu(torch.empty(0, 3), rm, rv)
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("shape, fmt", [((4, 6, 5, 3), torch.channels_last), ((5, 7), None)])
def test_the_kernels_read_the_callers_memory_no_copy_of_the_input(monkeypatch, shape, fmt):
    """channels_last input reaches the kernels as a (N*H*W, C) view of the same memory."""
    from bnlab.kernels import cpu as K

    seen = []
    real = K.forward_train
    monkeypatch.setattr(K, "forward_train", lambda x, *a: (seen.append(x), real(x, *a))[1])
    x = torch.randn(shape)
    x = x.contiguous(memory_format=fmt) if fmt else x
    A.batch_norm(x, None, None, training=True)
    (rows,) = seen
    assert rows.data_ptr() == x.data_ptr() and rows.is_contiguous()
    assert rows.shape == (x.numel() // x.shape[1], x.shape[1]) if fmt else rows.shape == x.shape


def test_strided_input_that_is_neither_layout_is_computed_on_a_copy_correctly():
    x = torch.randn(6, 4, 8)[:, :, ::2]  # non-contiguous in both senses
    want = TF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(A.batch_norm(x, None, None, training=True), want)


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_2d_statistics_stay_accurate_far_from_zero_in_float32(offset):
    """The one-pass 2-D statistics shift by the chunk's first row: no catastrophic cancellation."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(4099, 6, generator=g, dtype=torch.float64) * 0.5 + offset
    x = x64.float()
    rm, rv = torch.zeros(6), torch.ones(6)
    A.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), x.double().var(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(rm.double(), x.double().mean(0), rtol=1e-7, atol=0)


@pytest.mark.parametrize("be", ["cpu", "cuda"])
def test_bn_relu_keeps_nan_and_inf_as_torch_relu_does(be):
    x = torch.tensor([[1.0, -2.0], [float("nan"), float("inf")], [-float("inf"), 0.5]])
    rm, rv = torch.zeros(2), torch.ones(2)
    x, rm, rv = (t.to(DEV[be]) for t in (x, rm, rv))
    want = torch.relu(TF.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5))
    with torch.no_grad():
        got = A.batch_norm_relu(x, rm, rv, backend=be)
    torch.testing.assert_close(got, want, equal_nan=True)
