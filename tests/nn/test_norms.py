"""bnlab.nn.norms against torch.nn's LayerNorm, GroupNorm, InstanceNorm2d and BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import functional as F
from bnlab.nn import norms

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _randomize(*mods: nn.Module, seed: int = 1) -> None:
    """Same random gamma, beta in every module (ones/zeros would hide affine bugs)."""
    g = torch.Generator().manual_seed(seed)
    params = [dict(m.named_parameters()) for m in mods]
    for name, p in params[0].items():
        value = torch.randn(p.shape, generator=g, dtype=torch.float64)
        for ps in params:
            with torch.no_grad():
                ps[name].copy_(value)


def _compare(ours: nn.Module, ref: nn.Module, shape, dtype) -> None:
    ours, ref = ours.to(dtype), ref.to(dtype)
    _randomize(ours, ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g, dtype=dtype) + 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    dout = torch.randn(shape, generator=g, dtype=dtype)
    out, out_ref = ours(x), ref(x_ref)
    tol = TOL[dtype]
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    (out * dout).sum().backward()
    (out_ref * dout).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=tol, atol=tol, msg=name)


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape, normalized",
    [((4, 10), (10,)), ((3, 5, 7), (7,)), ((2, 3, 4, 5), (3, 4, 5)), ((2, 3, 4, 5), (4, 5))],
)
def test_layer_norm_matches_torch(shape, normalized, affine, dtype):
    _compare(
        norms.LayerNorm(normalized, elementwise_affine=affine),
        nn.LayerNorm(normalized, elementwise_affine=affine),
        shape,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "groups, shape", [(1, (3, 6, 4, 4)), (2, (3, 6, 4, 4)), (3, (2, 6, 5)), (6, (2, 6, 3, 3))]
)
def test_group_norm_matches_torch(groups, shape, affine, dtype):
    _compare(
        norms.GroupNorm(groups, shape[1], affine=affine),
        nn.GroupNorm(groups, shape[1], affine=affine),
        shape,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 3, 2)])
def test_instance_norm_matches_torch(shape, affine, dtype):
    _compare(
        norms.InstanceNorm2d(shape[1], affine=affine),
        nn.InstanceNorm2d(shape[1], affine=affine),
        shape,
        dtype,
    )


def test_layer_norm_without_bias_matches_torch():
    _compare(norms.LayerNorm(6, bias=False), nn.LayerNorm(6, bias=False), (4, 6), torch.float64)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 4)])
def test_normalize_over_batch_axes_is_training_batch_norm(shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ref = nn.functional.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(norms.batch_norm_train(x, w, b), ref, rtol=1e-12, atol=1e-12)


def test_group_norm_extremes_are_layer_and_instance_norm():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(norms.group_norm(x, 1), norms.normalize(x, (1, 2, 3)))
    torch.testing.assert_close(norms.group_norm(x, 4), norms.instance_norm(x))


def test_normalized_output_has_zero_mean_unit_variance_over_the_axes():
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64) * 5 - 3
    for kind in ("batch", "layer", "instance"):
        dims = norms.reduction_axes(kind, 4)
        out = norms.normalize(x, dims, eps=1e-12)
        assert out.mean(dims).abs().max() < 1e-12
        assert (out.var(dims, unbiased=False) - 1).abs().max() < 1e-9


def test_shared_statistics_masks_count_the_reduced_elements():
    n, c, h, w = 3, 4, 2, 2
    shape, index = (n, c, h, w), (1, 2, 0, 1)
    expected = {
        "batch": n * h * w,
        "layer": c * h * w,
        "instance": h * w,
        "group": 2 * h * w,  # 2 groups of 2 channels
    }
    fns = {
        kind: (lambda x, k=kind: norms.normalize(x, norms.reduction_axes(k, 4)))
        for kind in ("batch", "layer", "instance")
    }
    fns["group"] = lambda x: norms.group_norm(x, 2)
    for kind, fn in fns.items():
        mask = norms.shared_statistics(fn, shape, index)
        assert mask.sum().item() == expected[kind], kind
        assert mask[index]
    group_mask = norms.shared_statistics(fns["group"], shape, index)
    assert group_mask[1, 2:].all() and not group_mask[1, :2].any() and not group_mask[0].any()


def test_make_norm2d_builds_each_kind():
    x = torch.randn(4, 6, 3, 3)
    for kind in (*norms.KINDS, "none"):
        layer = norms.make_norm2d(kind, 6, groups=4)
        assert layer(x).shape == x.shape
    assert norms.make_norm2d("group", 6, groups=4).num_groups == 2
    with pytest.raises(ValueError, match="kind must be one of"):
        norms.make_norm2d("weight", 6)


def test_clear_errors():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="positive divisor"):
        norms.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="positive divisor"):
        norms.group_norm(x, 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        norms.layer_norm(x, (4, 4))
    with pytest.raises(ValueError, match="single value per statistic"):
        norms.normalize(torch.randn(1, 3), 0)
    with pytest.raises(ValueError, match="out of range"):
        norms.normalize(x, 4)
    with pytest.raises(ValueError, match="repeat"):
        norms.normalize(x, (1, -3))
    with pytest.raises(ValueError, match="instance norm needs spatial axes"):
        norms.instance_norm(torch.randn(4, 3))
    with pytest.raises(ValueError, match="6 channels"):
        norms.GroupNorm(2, 6)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match="6 channels"):  # as torch's, for `except RuntimeError`
        norms.GroupNorm(2, 6)(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        norms.normalize(torch.ones(4, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="GroupNorm reduces"):
        norms.reduction_axes("group", 4)


GROUP_NORM_EDGES = [  # (groups, shape): torch raises when N * (C / G) * spatial size == 1
    (groups, shape)
    for shape in [(1, 10, 1), (1, 10), (1, 10, 1, 1), (2, 10, 1), (1, 10, 2), (0, 10, 1), (1, 1)]
    for groups in (1, 5, 10)
    if shape[1] % groups == 0
]


@pytest.mark.parametrize("groups, shape", GROUP_NORM_EDGES)
def test_group_norm_refuses_exactly_when_torch_does(groups, shape):
    x = torch.randn(shape, dtype=torch.float64)
    ours, theirs = (
        norms.GroupNorm(groups, shape[1]).double(),
        nn.GroupNorm(groups, shape[1]).double(),
    )
    try:
        expected = theirs(x)
    except ValueError as torch_error:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel") as err:
            ours(x)
        assert "fewer groups" in str(err.value)  # and bnlab names the remedy
        assert str(list(shape)) in str(torch_error)
        return
    torch.testing.assert_close(ours(x), expected)


def test_half_precision_runs_in_float32_statistics():
    x = torch.randn(4, 6, 3, 3)
    out = norms.group_norm(x.half(), 2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), norms.group_norm(x, 2), rtol=0, atol=5e-3)
    assert F.reduce_dims(x) == norms.reduction_axes("batch", 4)


# ------------------------------------------------------------------ torch's own sample inputs
from torch_samples import assert_sample_matches_torch, samples  # noqa: E402

MODULE_DB = [s for name in ("LayerNorm", "GroupNorm", "InstanceNorm2d") for s in samples(name)]


@pytest.mark.parametrize(
    "sid, args, kwargs, fargs, training", MODULE_DB, ids=[s[0] for s in MODULE_DB]
)
def test_module_db_samples_match_torch(sid, args, kwargs, fargs, training):
    assert_sample_matches_torch(
        lambda name: getattr(norms, name), sid, args, kwargs, fargs, training
    )


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda kw: norms.LayerNorm(4, **kw), (3, 4)),
        (lambda kw: norms.LayerNorm((2, 3), **kw), (2, 2, 3)),
        (lambda kw: norms.GroupNorm(2, 4, **kw), (3, 4, 2)),
        (lambda kw: norms.InstanceNorm2d(3, affine=True, **kw), (2, 3, 2, 3)),
    ],
)
def test_norm_family_has_differentiable_gradients_and_factory_kwargs(make, shape):
    m = make({"dtype": torch.float64, "device": "cpu"})
    assert all(p.dtype == torch.float64 for p in m.parameters())
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))


def test_edge_cases_torch_accepts():
    dt = torch.float64
    x = torch.randn(3, 1, dtype=dt)
    torch.testing.assert_close(norms.LayerNorm(1, dtype=dt)(x), nn.LayerNorm(1, dtype=dt)(x))
    x = torch.randn(5, 4, dtype=dt)  # four groups of one value, five samples
    torch.testing.assert_close(norms.GroupNorm(4, 4, dtype=dt)(x), nn.GroupNorm(4, 4, dtype=dt)(x))
    x = torch.randn(3, 4, 5, dtype=dt)  # unbatched (C, H, W)
    torch.testing.assert_close(norms.InstanceNorm2d(3)(x), nn.InstanceNorm2d(3)(x))
    with pytest.raises(ValueError, match="4D .* or unbatched 3D"):
        norms.InstanceNorm2d(3)(torch.randn(3, 4))


# ------------------------------------------------------------------ ported from torch
# test/test_nn.py's _test_LayerNorm_general and _test_GroupNorm_general, re-expressed: the
# same shapes, bnlab against torch.nn (torch's versions check mean 0 / var 1 with eps=0,
# which bnlab refuses: eps must be > 0, see docs/bad-inputs.md).


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((1, 2, 3, 4), 2),
        ((2, 3, 10), 3),
        ((3, 1, 1, 1, 2), 1),
        ((2, 6, 4, 2, 2), 3),
        ((1, 256, 1, 1), 32),
    ],
)
def test_GroupNorm_general(shape, groups):  # noqa: N802 (torch's name)
    torch.manual_seed(0)
    x = torch.empty(shape, dtype=torch.float64).uniform_(0, 10).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ours = norms.GroupNorm(groups, shape[1], dtype=torch.float64)
    ref = nn.GroupNorm(groups, shape[1], dtype=torch.float64)
    out, ref_out = ours(x), ref(xr)
    torch.testing.assert_close(out, ref_out)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_out.backward(grad)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize(
    "norm_shape, input_shape", [((2, 3), (3,)), ((2,), (1, 2, 3)), ((10,), (2, 3)), (10, (2, 3))]
)
def test_LayerNorm_general_bad_shapes(norm_shape, input_shape):  # noqa: N802 (torch's name)
    with pytest.raises(RuntimeError):
        nn.LayerNorm(norm_shape)(torch.rand(input_shape))
    with pytest.raises(RuntimeError, match="normalized_shape"):  # bnlab: ValueError too
        norms.LayerNorm(norm_shape)(torch.rand(input_shape))


def test_zca_whiten_decorrelates_where_batch_norm_does_not():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, -0.5, 2.0]], dtype=torch.float64)
    x = torch.randn(4096, 3, generator=gen, dtype=torch.float64) @ mixing.T + 5
    white = norms.zca_whiten(x, eps=1e-12)
    zeros, eye = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(white.mean(0), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(white.T @ white / len(x), eye, atol=1e-9, rtol=0)
    standardized = norms.batch_norm_train(x, eps=1e-12)
    assert torch.allclose(torch.corrcoef(standardized.T), torch.corrcoef(x.T), atol=1e-12)


def test_zca_whiten_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        norms.zca_whiten(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="eps"):
        norms.zca_whiten(torch.randn(8, 3), eps=0.0)
