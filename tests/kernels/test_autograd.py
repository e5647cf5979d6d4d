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


from helpers import PROPERTY_SETTINGS  # noqa: E402
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
