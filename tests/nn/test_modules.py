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


@pytest.mark.parametrize("version", [None, 1, 2])
@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_num_batches_tracked_loads_as_in_torch(version, strict):
    """Version < 2 (before torch had the counter): the module keeps its own counter.

    Version 2: both keep the counter and report the key missing (strict raises).
    """
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    if version is None:
        del state._metadata[""]["version"]
    else:
        state._metadata[""]["version"] = version
    results = []
    for cls in (modules.BatchNorm2d, nn.BatchNorm2d):
        m = cls(3)
        m.num_batches_tracked.fill_(7)
        try:
            report = m.load_state_dict(state, strict=strict)
            results.append((m.num_batches_tracked.item(), report.missing_keys, None))
        except RuntimeError as err:
            results.append((m.num_batches_tracked.item(), None, str(err)))
    assert results[0] == results[1]
    assert results[0][0] == 7


@pytest.mark.parametrize("strict", [True, False])
def test_state_dicts_round_trip_with_torch_in_both_directions(strict):
    torch.manual_seed(0)
    ours, ref = modules.BatchNorm2d(3), nn.BatchNorm2d(3)
    for m in (ours, ref):
        m(torch.randn(4, 3, 2, 2) * 2 + 1)
    for src, dst in ((ours, nn.BatchNorm2d(3)), (ref, modules.BatchNorm2d(3))):
        dst.load_state_dict(src.state_dict(), strict=strict)
        for key, value in src.state_dict().items():
            assert torch.equal(dst.state_dict()[key], value), key
    extra = {**ref.state_dict(), "extra": torch.zeros(1)}
    messages = []
    for cls in (modules.BatchNorm2d, nn.BatchNorm2d):
        try:
            report = cls(3).load_state_dict(extra, strict=strict)
            messages.append(report.unexpected_keys)
        except RuntimeError as err:
            messages.append(str(err).split("\n", 1)[1])  # torch's message after the class line
    assert messages[0] == messages[1]


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


# ------------------------------------------------------------------ torch's own sample inputs
from torch_samples import assert_sample_matches_torch, samples  # noqa: E402

MODULE_DB = [s for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d") for s in samples(name)]


@pytest.mark.parametrize(
    "sid, args, kwargs, fargs, training", MODULE_DB, ids=[s[0] for s in MODULE_DB]
)
def test_module_db_samples_match_torch(sid, args, kwargs, fargs, training):
    assert_sample_matches_torch(
        lambda name: getattr(modules, name), sid, args, kwargs, fargs, training
    )


# ------------------------------------------------------------------ empty batches


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (0, 3, 0, 0)])
def test_empty_batch_returns_empty_keeps_stats_and_counts_the_batch(shape):
    ours, ref = modules.BatchNorm2d(3), nn.BatchNorm2d(3)
    for m in (ours, ref):
        m(torch.randn(4, 3, 2, 2) * 2 + 1)  # non-trivial running statistics first
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    y_o, y_r = ours(x), ref(x)
    assert y_o.shape == y_r.shape == shape
    y_o.sum().backward()
    assert x.grad.shape == shape and torch.equal(ours.weight.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert ours.num_batches_tracked == ref.num_batches_tracked == 2


# ------------------------------------------------------------------ higher-order derivatives


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_second_derivatives_pass_gradgradcheck(name, training):
    dims = {"BatchNorm1d": (5, 3), "BatchNorm2d": (4, 3, 2, 2), "BatchNorm3d": (3, 3, 2, 2, 2)}
    torch.manual_seed(0)
    m = getattr(modules, name)(3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_var.uniform_(0.5, 2.0)
    m.train(training)
    x = torch.randn(dims[name], dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs w and b in place: they are the module's own parameters
    assert torch.autograd.gradgradcheck(lambda x, w, b: m(x), (x, m.weight, m.bias))


def test_gradient_penalty_matches_torch():
    """WGAN-GP's term, |d out / d x|^2, differentiated again with respect to the weights."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = []
    for cls in (modules.BatchNorm1d, nn.BatchNorm1d):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(3, 4), cls(4), nn.Tanh(), nn.Linear(4, 1)).double()
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        gx.square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the bad-input catalogue
# One row per input torch refuses or bnlab cannot honour: (id, call, exception, words the
# message must contain: the argument and the remedy). docs/bad-inputs.md lists every row.


def _fresh():
    torch.manual_seed(0)
    bn = modules.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2) * 2 + 1)
    return bn


def _functional(**overrides):
    from bnlab.nn import functional as F

    args = dict(
        x=torch.randn(4, 3, 2, 2),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        weight=torch.ones(3),
        bias=torch.zeros(3),
        training=True,
        momentum=0.1,
        eps=1e-5,
    )
    args.update(overrides)
    state = [t for t in args.values() if isinstance(t, torch.Tensor)]
    return (lambda: F.batch_norm(**args)), state


def _module(x, **attrs):
    bn = _fresh()
    for k, v in attrs.items():
        setattr(bn, k, v)
    return (lambda: bn(x)), list(bn.state_dict().values())


def _kernel(x, backend="cpu"):
    from bnlab.kernels import autograd as A

    bn = A.BatchNorm2d(3)
    return (lambda: A.batch_norm(x, bn.running_mean, bn.running_var, training=True,
                                 backend=backend)), list(bn.state_dict().values())  # fmt: skip


def _group_norm(x):
    from bnlab.nn import norms

    gn = norms.GroupNorm(10, 10)
    return (lambda: gn(x)), list(gn.state_dict().values())


BAD_INPUTS = [
    ("running_var of the wrong size", lambda: _functional(running_var=torch.ones(2)),
     ValueError, ["running_var", "shape (3,)"]),
    ("bias of the wrong size", lambda: _functional(bias=torch.zeros(4)),
     ValueError, ["bias", "shape (3,)"]),
    ("weight on another device", lambda: _functional(weight=torch.ones(3, device="meta")),
     ValueError, ["weight is on meta", "weight.to(input.device)"]),
    ("integer input", lambda: _functional(x=torch.ones(4, 3, dtype=torch.int64)),
     TypeError, ["input", "input.float()"]),
    ("integer running_mean", lambda: _functional(running_mean=torch.zeros(3, dtype=torch.int64)),
     TypeError, ["running_mean", "running_mean.float()"]),
    ("eps of 0", lambda: _functional(eps=0.0), ValueError, ["eps", "default is 1e-5"]),
    ("module: momentum above 1", lambda: _module(torch.randn(4, 3, 2, 2), momentum=1.5),
     ValueError, ["momentum", "convert_momentum"]),
    ("1-D input", lambda: _functional(x=torch.randn(5)),
     ValueError, ["at least 2 dimensions", "x.unsqueeze(1)"]),
    ("one value per channel in training", lambda: _functional(x=torch.randn(1, 3)),
     ValueError, ["more than 1 value per channel", "batch of at least 2", "model.eval()"]),
    ("eval without running statistics",
     lambda: _functional(running_mean=None, running_var=None, training=False),
     ValueError, ["running_mean and running_var are required", "training=True"]),
    ("running_mean without running_var", lambda: _functional(running_var=None),
     ValueError, ["together", "running_mean"]),
    ("module: wrong channel count", lambda: _module(torch.randn(4, 5, 2, 2)),
     ValueError, ["expected 3 channels", "BatchNorm2d(5)"]),
    ("module: wrong rank", lambda: _module(torch.randn(4, 3)),
     ValueError, ["expected 4D", "BatchNorm1d takes (N, C)"]),
    ("module: batch of one in training", lambda: _module(torch.randn(1, 3, 1, 1)),
     ValueError, ["more than 1 value per channel", "drop_last=True"]),
    ("module: momentum attribute set to 2", lambda: _module(torch.randn(4, 3, 2, 2), momentum=2),
     ValueError, ["momentum", "convert_momentum"]),
    ("module: eps attribute set to -1", lambda: _module(torch.randn(4, 3, 2, 2), eps=-1.0),
     ValueError, ["eps", "default is 1e-5"]),
    ("kernels: float16 input", lambda: _kernel(torch.randn(4, 3, 2, 2).half()),
     TypeError, ["float32 and float64", ".float()"]),
    ("kernels: unknown backend", lambda: _kernel(torch.randn(4, 3, 2, 2), backend="tpu"),
     ValueError, ["backend must be one of", "'cpu'"]),
    ("norms: GroupNorm with one value in all per group", lambda: _group_norm(torch.randn(1, 10, 1)),
     ValueError, ["Expected more than 1 value per channel", "fewer groups"]),
]  # fmt: skip


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_is_refused_clearly_before_any_state_changes(row):
    _id, build, error, words = row
    call, state = build()
    state = [t for t in state if t.device.type != "meta"]  # meta tensors hold no values
    before = [t.clone() for t in state]
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)
    for a, b in zip(state, before, strict=True):
        assert torch.equal(a, b), "a refused call changed state"


# torch raises RuntimeError for these (code written against it says `except RuntimeError`);
# bnlab's error is both a RuntimeError and, like every refusal in the catalogue, a ValueError.
MISMATCH_IDS = ("module: wrong channel count", "weight on another device",
                "running_var of the wrong size", "bias of the wrong size")  # fmt: skip
MISMATCHES = [r for r in BAD_INPUTS if r[0] in MISMATCH_IDS]


@pytest.mark.parametrize("row", MISMATCHES, ids=[r[0] for r in MISMATCHES])
def test_channel_and_device_mismatches_are_runtime_errors_as_in_torch(row):
    _id, build, _error, _words = row
    call, _state = build()
    with pytest.raises(RuntimeError) as caught:
        call()
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_a_channel_mismatch_raises_what_torch_raises(name):
    shape = {"BatchNorm1d": (4, 5), "BatchNorm2d": (4, 5, 2, 2), "BatchNorm3d": (4, 5, 2, 2, 2)}
    x = torch.randn(shape[name])
    with pytest.raises(RuntimeError):
        getattr(nn, name)(3)(x)
    with pytest.raises(RuntimeError, match="expected 3 channels"):
        getattr(modules, name)(3)(x)


def test_the_docs_list_every_bad_input_row():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md").read_text()
    missing = [r[0] for r in BAD_INPUTS if f"| {r[0]} |" not in doc]
    assert not missing, f"docs/bad-inputs.md lacks rows {missing}"
    assert doc.startswith("# Bad inputs"), f"stray text before the title: {doc.splitlines()[0]!r}"


# ------------------------------------------------------------------ property-based parity
from helpers import PROPERTY_SETTINGS  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _bn_case(draw):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[rank]
    channels = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(0, 3), min_size=rank - 2, max_size=rank - 2))
    shape = (draw(st.integers(0, 5)), channels, *spatial)
    return dict(
        name=name,
        shape=shape,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        channels_last=rank == 4 and draw(st.booleans()),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=draw(st.sampled_from([None, 0.1, 0.5, 1.0, 0.0])),
        modes=draw(st.lists(st.booleans(), min_size=1, max_size=4)),  # True: a training call
        seed=draw(st.integers(0, 2**16)),
    )


@PROPERTY_SETTINGS
@given(_bn_case())
def test_random_shapes_flags_and_call_sequences_match_torch(case):
    """Outputs, input gradients, running statistics and state_dicts, call after call."""
    kwargs = dict(
        affine=case["affine"], track_running_stats=case["track"], momentum=case["momentum"]
    )
    ours = getattr(modules, case["name"])(case["shape"][1], dtype=case["dtype"], **kwargs)
    ref = getattr(nn, case["name"])(case["shape"][1], dtype=case["dtype"], **kwargs)
    tol = 1e-4 if case["dtype"] == torch.float32 else 1e-10
    g = torch.Generator().manual_seed(case["seed"])
    for training in case["modes"]:
        x = torch.randn(case["shape"], generator=g, dtype=case["dtype"]) * 3 + 1
        if case["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        outcomes = []
        for m in (ours, ref):
            xi = x.clone().requires_grad_()
            try:
                y = m.train(training)(xi)
            except ValueError as err:  # both must refuse, e.g. one value per channel
                outcomes.append(("refused", "value per channel" in str(err)))
                continue
            y.backward(torch.ones_like(y) + y.detach())
            outcomes.append((y.detach(), xi.grad))
        if outcomes[1][0] == "refused":
            assert outcomes[0] == ("refused", True) and outcomes[1][1], outcomes
            # torch has already counted the refused batch in num_batches_tracked; bnlab
            # refuses before any buffer changes. The states differ from here on, by design.
            assert ours.state_dict().keys() == ref.state_dict().keys()
            break
        (y_o, g_o), (y_r, g_r) = outcomes
        assert y_o.shape == y_r.shape
        torch.testing.assert_close(y_o, y_r, rtol=tol, atol=tol, equal_nan=False)
        torch.testing.assert_close(g_o, g_r, rtol=tol * 10, atol=tol * 10)
        so, sr = ours.state_dict(), ref.state_dict()
        assert list(so) == list(sr)
        for key in sr:
            torch.testing.assert_close(so[key], sr[key], rtol=tol, atol=tol)


# ------------------------------------------------------------------ ported from torch
# The BatchNorm tests of PyTorch's test/test_nn.py (TestNN), re-expressed for bnlab: each
# keeps the original's name and asserts what it asserts, with bnlab's module or functional
# where torch's stood and torch's own result as the reference.
from functools import partial  # noqa: E402

import torch.autograd.forward_ad as fwAD  # noqa: E402

from bnlab.nn import functional as BF  # noqa: E402


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
@pytest.mark.parametrize(
    "dtype, mixed", [(torch.float, False), (torch.bfloat16, False), (torch.bfloat16, True)]
)
def test_batchnorm_nhwc_cpu(shape, dtype, mixed):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bn, ref = modules.BatchNorm2d(shape[1]).to(dtype), nn.BatchNorm2d(shape[1]).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref.load_state_dict(bn.state_dict())
    if mixed:
        bn.float()
        ref.float()
    xi, xr = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    out, ref_out = bn(xi), ref(xr)
    out.backward(grad)
    ref_out.backward(grad.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = {} if dtype == torch.float else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, **tol)
    torch.testing.assert_close(xi.grad, xr.grad, **tol)


def test_batchnorm_non_contig_cpu():
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = modules.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref = nn.BatchNorm2d(2).eval()
    ref.load_state_dict(bn.state_dict())
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref(x.contiguous()))


def test_batchnorm_raises_error_if_less_than_one_value_per_channel():
    with pytest.raises(ValueError):
        modules.BatchNorm1d(10)(torch.rand(10)[None, :, None])


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_batchnorm_raises_error_if_vector_is_not_same_size_as_input(which, size):
    """torch's four tests (running_mean, running_var, weight, bias), one parametrized test."""
    args = dict(running_mean=torch.rand(10), running_var=torch.rand(10))
    args[which] = torch.rand(size)
    with pytest.raises(RuntimeError):  # as torch raises (bnlab's is a ValueError too)
        BF.batch_norm(torch.rand(2, 10), **args)


def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad():
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    fn = partial(BF.batch_norm, training=False, momentum=-1.2)
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(x) for x in args)
        with fwAD.dual_level():
            duals = [
                fwAD.make_dual(primal, tangent) if i in dual_indices else primal
                for i, (primal, tangent) in enumerate(zip(args, tangents, strict=True))
            ]
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                    fn(*duals)
            else:
                fn(*duals)


def test_batchnorm_buffer_update_when_stats_are_not_tracked():
    bn = modules.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False  # use the buffers, do not update them
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.rand(32, 4))
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


def test_batchnorm_simple_average_and_momentum_none():
    """torch's module tests 2d_simple_average: momentum=None is the cumulative mean."""
    torch.manual_seed(0)
    ours, ref = modules.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, momentum=None)
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_numpy_momentum_and_half_precision_as_in_torch():
    import numpy as np

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    ours = modules.BatchNorm2d(3, momentum=np.float32(0.3))
    ref = nn.BatchNorm2d(3, momentum=np.float32(0.3))
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    for dtype in (torch.float16, torch.bfloat16):  # float32 buffers, half input: torch's AMP case
        ours, ref = modules.BatchNorm2d(3), nn.BatchNorm2d(3)
        y_o, y_r = ours(x.to(dtype)), ref(x.to(dtype))
        assert y_o.dtype == y_r.dtype == dtype
        torch.testing.assert_close(y_o, y_r)
        torch.testing.assert_close(ours.running_var, ref.running_var)
