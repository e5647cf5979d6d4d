"""bnlab.nn.modules.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d, step by step."""

from __future__ import annotations

import inspect
import itertools
import zlib

import pytest
import torch
from torch import nn

from bnlab.nn import modules

PAIRS = {
    (2,): (modules.BatchNorm1d, nn.BatchNorm1d),
    (3,): (modules.BatchNorm1d, nn.BatchNorm1d),
    (4,): (modules.BatchNorm2d, nn.BatchNorm2d),
    (5,): (modules.BatchNorm3d, nn.BatchNorm3d),
}
SHAPES = [(8, 3), (5, 4, 7), (4, 3, 5, 6), (2, 3, 3, 4, 5), (2, 1, 1, 1), (3, 6, 2, 2)]
# torch 2.14 added BatchNorm(..., bias=False); older releases have no such argument.
TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}

# Largest differences seen; tests/conftest.py prints them in pytest's summary.
MAX_DIFF: dict[torch.dtype, float] = {torch.float32: 0.0, torch.float64: 0.0}


def make_pair(shape, dtype, **kwargs):
    ours_cls, torch_cls = PAIRS[(len(shape),)]
    ours = ours_cls(shape[1], dtype=dtype, **kwargs)
    ref = torch_cls(shape[1], dtype=dtype, **kwargs)
    if ref.affine:  # non-trivial affine parameters, identical in both
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(ref.weight)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
                ours.bias.copy_(ref.bias)
    return ours, ref


def assert_close(a, b, dtype, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    MAX_DIFF[dtype] = max(MAX_DIFF[dtype], diff)
    torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def run_steps(ours, ref, shape, dtype, steps, channels_last=False, gen=None):
    """Train for ``steps`` steps, then one eval step; compare everything each time."""
    for step in range(steps + 1):
        if step == steps:
            ours.eval()
            ref.eval()
        x = torch.randn(*shape, dtype=dtype, generator=gen) * 3 + 1.5
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert_close(ya, yb, dtype, f"output at step {step}")
        dout = torch.randn(*shape, dtype=dtype, generator=gen)
        ya.backward(dout)
        yb.backward(dout)
        assert_close(xa.grad, xb.grad, dtype, f"input grad at step {step}")
        if ref.affine:
            assert_close(ours.weight.grad, ref.weight.grad, dtype, "weight grad")
            if ref.bias is not None:
                assert_close(ours.bias.grad, ref.bias.grad, dtype, "bias grad")
        assert_close(ours.running_mean, ref.running_mean, dtype, "running_mean")
        assert_close(ours.running_var, ref.running_var, dtype, "running_var")
        if ref.num_batches_tracked is None:
            assert ours.num_batches_tracked is None
        else:
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize(
    "shape,dtype,momentum,affine,track",
    list(
        itertools.product(
            SHAPES, [torch.float32, torch.float64], [0.1, 0.5, None], [True, False], [True, False]
        )
    ),
)
def test_matches_torch_over_steps(shape, dtype, momentum, affine, track):
    # crc32, not hash(): hash(None) changes from one process to the next
    seed = zlib.crc32(repr((shape, dtype, momentum, affine, track)).encode())
    gen = torch.Generator().manual_seed(seed)
    ours, ref = make_pair(shape, dtype, momentum=momentum, affine=affine, track_running_stats=track)
    run_steps(ours, ref, shape, dtype, steps=3, gen=gen)


@pytest.mark.skipif(not TORCH_HAS_BIAS_ARG, reason="this torch has no BatchNorm bias argument")
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_false_matches_torch(shape):
    gen = torch.Generator().manual_seed(2)
    ours, ref = make_pair(shape, torch.float64, bias=False)
    assert ours.bias is None and ref.bias is None
    run_steps(ours, ref, shape, torch.float64, steps=2, gen=gen)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_input(dtype):
    shape = (4, 5, 6, 7)
    gen = torch.Generator().manual_seed(1)
    ours, ref = make_pair(shape, dtype)
    run_steps(ours, ref, shape, dtype, steps=2, channels_last=True, gen=gen)


def test_momentum_none_is_cumulative_average():
    bn = modules.BatchNorm1d(2, momentum=None)
    xs = [torch.randn(10, 2) + i for i in range(5)]
    for x in xs:
        bn(x)
    expected = torch.stack([x.mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    assert bn.num_batches_tracked.item() == 5


def test_running_var_is_unbiased_and_normalization_biased():
    x = torch.tensor([[1.0], [2.0], [4.0]])
    bn = modules.BatchNorm1d(1, momentum=1.0, affine=False)
    y = bn(x)
    assert bn.running_var.item() == pytest.approx(x.var(unbiased=True).item())
    biased = x.var(unbiased=False)
    torch.testing.assert_close(y, (x - x.mean()) / torch.sqrt(biased + bn.eps))


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    ours, ref = make_pair((6, 4, 3, 3), torch.float32, momentum=0.3)
    ours(torch.randn(6, 4, 3, 3))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    ref(torch.randn(6, 4, 3, 3))
    ours.load_state_dict(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_state_dict_keys_without_affine_or_tracking():
    for kwargs in (dict(affine=False), dict(track_running_stats=False), dict()):
        ours, ref = modules.BatchNorm2d(3, **kwargs), nn.BatchNorm2d(3, **kwargs)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


def test_loads_old_checkpoint_without_num_batches_tracked():
    ref = nn.BatchNorm2d(3)
    state = ref.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours = modules.BatchNorm2d(3)
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0


def test_defaults_and_repr_match_torch():
    for ours_cls, torch_cls in PAIRS.values():
        ours, ref = ours_cls(7), torch_cls(7)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
        expected = ref.extra_repr()
        if not TORCH_HAS_BIAS_ARG:  # older torch prints no bias entry
            expected = expected.replace("affine=True, ", "affine=True, bias=True, ")
        assert ours.extra_repr() == expected


def test_device_and_dtype_arguments():
    bn = modules.BatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn(torch.randn(2, 3, 2, 2, dtype=torch.float64)).dtype == torch.float64


def test_half_precision_input_keeps_float32_stats():
    x = torch.randn(8, 3, 4, 4)
    ours, ref = modules.BatchNorm2d(3), nn.BatchNorm2d(3)
    ya, yb = ours(x.bfloat16()), ref(x.bfloat16())
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-3, rtol=1e-3)


def test_output_memory_format_follows_input():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = modules.BatchNorm2d(3)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ---- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,shape,match",
    [
        (modules.BatchNorm1d, (2, 3, 4, 5), r"BatchNorm1d expected 2D or 3D input \(got 4D"),
        (modules.BatchNorm2d, (2, 3, 4), r"BatchNorm2d expected 4D input \(got 3D"),
        (modules.BatchNorm3d, (2, 3, 4, 5), r"BatchNorm3d expected 5D input \(got 4D"),
    ],
)
def test_wrong_rank(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(3)(torch.randn(*shape))


def test_channel_mismatch():
    with pytest.raises(ValueError, match=r"expected 3 channels in dimension 1, got 4"):
        modules.BatchNorm2d(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_single_value_per_channel_in_training(shape):
    cls = PAIRS[(len(shape),)][0]
    bn = cls(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(*shape))
    # torch raises on the same inputs
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        PAIRS[(len(shape),)][1](3)(torch.randn(*shape))
    bn.eval()
    assert bn(torch.randn(*shape)).shape == shape  # eval mode uses running stats: fine


def test_batch_of_one_with_spatial_extent_is_allowed():
    modules.BatchNorm2d(3)(torch.randn(1, 3, 2, 2))  # 4 values per channel


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), "1e-5"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        modules.BatchNorm2d(3, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, 0.99 + 1])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None"):
        modules.BatchNorm2d(3, momentum=momentum)


def test_momentum_changed_after_construction_is_checked():
    bn = modules.BatchNorm1d(2)
    bn.momentum = 2.0
    with pytest.raises(ValueError, match="momentum must be in"):
        bn(torch.randn(4, 2))


def test_integer_input():
    with pytest.raises(TypeError, match=r"floating-point input \(got dtype torch.int64\)"):
        modules.BatchNorm1d(2)(torch.ones(4, 2, dtype=torch.long))


def test_integer_dtype_argument():
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        modules.BatchNorm1d(2, dtype=torch.int32)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_num_features(n):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        modules.BatchNorm1d(n)
