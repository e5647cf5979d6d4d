"""bnlab.nn.functional: forward, both backward forms, autograd Function, running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from bnlab.nn import functional as F

SHAPES = [(6, 3), (4, 3, 7), (3, 2, 5, 5), (2, 3, 2, 3, 4)]


def rand_case(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=dtype, generator=gen) * 2 + 0.5
    c = shape[1]
    gamma = torch.rand(c, dtype=dtype, generator=gen) + 0.5
    beta = torch.randn(c, dtype=dtype, generator=gen)
    dout = torch.randn(*shape, dtype=dtype, generator=gen)
    return x, gamma, beta, dout


@pytest.mark.parametrize("shape", SHAPES)
def test_reduce_dims_and_stats(shape):
    x, *_ = rand_case(shape)
    mean, var = F.batch_stats(x)
    dims = F.reduce_dims(x)
    assert 1 not in dims and len(dims) == x.dim() - 1
    torch.testing.assert_close(mean, x.mean(dim=dims))
    torch.testing.assert_close(var, x.var(dim=dims, unbiased=False))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_torch_functional(shape):
    x, gamma, beta, _ = rand_case(shape)
    out, _ = F.batchnorm_forward(x, gamma, beta, eps=1e-5)
    ref = TF.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backward", [F.batchnorm_backward_staged, F.batchnorm_backward_compact])
def test_backward_forms_match_autograd(shape, backward):
    x, gamma, beta, dout = rand_case(shape, seed=3)
    out, cache = F.batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dout, cache)
    xr, gr, br = (t.clone().requires_grad_() for t in (x, gamma, beta))
    TF.batch_norm(xr, None, None, gr, br, training=True, eps=1e-5).backward(dout)
    torch.testing.assert_close(dx, xr.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dgamma, gr.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dbeta, br.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_staged_and_compact_agree(shape):
    x, gamma, beta, dout = rand_case(shape, seed=5)
    _, cache = F.batchnorm_forward(x, gamma, beta)
    staged = F.batchnorm_backward_staged(dout, cache)
    compact = F.batchnorm_backward_compact(dout, cache)
    for a, b in zip(staged, compact, strict=True):
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert rel < 1e-12


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_autograd_function(training, affine):
    x, gamma, beta, _ = rand_case((4, 3, 2, 2), seed=7)
    x.requires_grad_()
    if affine:
        gamma.requires_grad_()
        beta.requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, *params):
        w, b = params if affine else (None, None)
        # fresh running buffers so the in-place update does not leak between calls
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    inputs = (x, gamma, beta) if affine else (x,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_stats_update_like_torch(momentum):
    x, *_ = rand_case((5, 4, 3), seed=11)
    rm_a, rv_a = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm_b, rv_b = rm_a.clone(), rv_a.clone()
    F.batch_norm(x, rm_a, rv_a, training=True, momentum=momentum)
    TF.batch_norm(x, rm_b, rv_b, training=True, momentum=momentum)
    torch.testing.assert_close(rm_a, rm_b)
    torch.testing.assert_close(rv_a, rv_b)


def test_eval_mode_uses_running_stats_and_leaves_them():
    x, gamma, beta, _ = rand_case((5, 2, 3))
    rm, rv = torch.tensor([1.0, -1.0], dtype=x.dtype), torch.tensor([4.0, 0.25], dtype=x.dtype)
    out = F.batch_norm(x, rm, rv, gamma, beta, training=False)
    ref = TF.batch_norm(x, rm, rv, gamma, beta, training=False)
    torch.testing.assert_close(out, ref)
    assert rm.tolist() == [1.0, -1.0] and rv.tolist() == [4.0, 0.25]


def test_averaging_factor():
    assert F.averaging_factor(0.3, torch.tensor(5)) == 0.3
    assert F.averaging_factor(None, torch.tensor(4)) == 0.25
    assert F.averaging_factor(None, None) == 0.0


def test_convert_momentum_round_trip():
    assert F.convert_momentum(0.1, to="keras") == pytest.approx(0.9)
    assert F.convert_momentum(0.99, to="pytorch") == pytest.approx(0.01)
    assert F.convert_momentum(F.convert_momentum(0.3, "keras"), "pytorch") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="to must be"):
        F.convert_momentum(0.1, to="tf")


def test_functional_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(
        ValueError, match=r"running_mean must have shape \(3,\).*got running_mean of shape \(2,\)"
    ):
        F.batch_norm(x, torch.zeros(2), torch.ones(2), training=False)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        F.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(TypeError, match="floating-point input"):
        F.batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, training=True)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        F.batch_norm(x, None, None, training=True, eps=0.0)


# ------------------------------------------------------------------ parity with torch's functional


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)  # inside torch.func
def test_gradgradcheck_and_jvp_match_torch(training):
    from torch.func import jvp

    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(5, 3, 2, dtype=dt, requires_grad=True)
    w = (torch.rand(3, dtype=dt) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=dt, requires_grad=True)
    rm, rv = torch.randn(3, dtype=dt), torch.rand(3, dtype=dt) + 0.5
    stats = (None, None) if training else (rm, rv)

    def ours(x, w, b):
        return F.batch_norm(x, *stats, w, b, training=training)

    def theirs(x, w, b):
        return TF.batch_norm(x, *stats, w, b, training=training)

    assert torch.autograd.gradgradcheck(ours, (x, w, b))
    primals = tuple(t.detach() for t in (x, w, b))
    tangents = tuple(torch.randn_like(t) for t in primals)
    (out_o, tan_o), (out_t, tan_t) = jvp(ours, primals, tangents), jvp(theirs, primals, tangents)
    torch.testing.assert_close(out_o, out_t)
    torch.testing.assert_close(tan_o, tan_t)


def test_empty_input_leaves_running_statistics_alone():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = (rm.clone(), rv.clone())
    for shape in ((0, 3), (2, 3, 0)):
        out = F.batch_norm(torch.randn(shape), rm, rv, training=True)
        assert out.shape == shape
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    x = torch.randn(6, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm, rv, training=True, momentum=np.float32(0.5), eps=np.float64(1e-3))
    ref_m, ref_v = torch.zeros(3), torch.ones(3)
    TF.batch_norm(x, ref_m, ref_v, training=True, momentum=0.5, eps=1e-3)
    torch.testing.assert_close(rm, ref_m)
    torch.testing.assert_close(rv, ref_v)


# ------------------------------------------------------------------ torch's OpInfo samples
def _opinfo_samples():
    from bnlab.kernels.backend import cuda_module

    cuda_module()  # torch's test utilities import numba.cuda: let bnlab pick the target first
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.batch_norm" and not o.variant_test_name)
    return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


OPINFO = _opinfo_samples()


@pytest.mark.parametrize("sample", OPINFO, ids=[f"opinfo{i}" for i in range(len(OPINFO))])
def test_opinfo_samples_match_torch(sample):
    """Output, gradients and the running statistics after the call, for every OpInfo sample."""

    def run(fn):
        x = sample.input.detach().clone().requires_grad_()
        args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in sample.args]
        for i in (2, 3):  # weight and bias get gradients too
            if i < len(args) and isinstance(args[i], torch.Tensor):
                args[i].requires_grad_()
        out = fn(x, *args, **sample.kwargs)
        leaves = [x] + [a for a in args[2:4] if isinstance(a, torch.Tensor)]
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True) if out.numel() else []
        return out, grads, args[:2]

    (out_o, grads_o, stats_o), (out_t, grads_t, stats_t) = run(F.batch_norm), run(TF.batch_norm)
    torch.testing.assert_close(out_o, out_t)
    for a, b in zip(grads_o, grads_t, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(stats_o, stats_t, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
