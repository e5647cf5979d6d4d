"""bnlab.kernels.ops: the kernels as registered torch operators, and torch.compile over them.

make test: torch.library.opcheck on each operator (CPU kernels) and one small model
compiled with backend "aot_eager". make test-deep: opcheck on the CUDA kernels (or the
simulator), and the matrix (layouts, BatchNorm1d 2-D and 3-D, eval, momentum=None,
affine=False, no running statistics, BN + ReLU) under "aot_eager" and "inductor".
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import deep_only
from torch import nn

from bnlab.kernels import autograd as A
from bnlab.kernels import ops

# --- torch.library.opcheck: schema (nothing written that is not declared), the autograd
# registration, the fake implementations against the real ones, and AOTAutograd's trace
# with dynamic shapes (outputs and gradients against eager)


def _opcheck_cases(backend: str, device: str = "cpu") -> dict:
    """Small float64 arguments for each operator, in each of its modes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g) + 0.5
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x, w, b, rm, rv, dy = (t.to(device, torch.float64) for t in (x, w, b, rm, rv, dy))
    count = torch.tensor(3, device=device)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    _, mean, invstd, _, _ = ops.batch_norm_train(x, w, b, rm, rv, 0.1, None, 1e-5, backend)
    train, evaluate, backward = ops.batch_norm_train, ops.batch_norm_eval, ops.batch_norm_backward
    return {
        "train": (train, (xg, wg, bg, rm, rv, 0.1, None, 1e-5, backend)),
        "train-cumulative": (train, (xg, wg, None, rm, rv, None, count, 1e-3, backend)),
        "train-no-buffers": (train, (xg, None, None, None, None, 0.1, None, 1e-5, backend)),
        "eval": (evaluate, (xg, rm, rv, wg, bg, 1e-5, False, backend)),
        "eval-relu": (evaluate, (x, rm, rv, w, b, 1e-5, True, backend)),
        "backward": (backward, (dy, x, mean, invstd, w, True, backend)),
        "backward-eval": (backward, (dy, x, mean, invstd, None, False, backend)),
    }


OPCHECK_CASES = ("train", "train-cumulative", "train-no-buffers", "eval", "eval-relu")
OPCHECK_CASES += ("backward", "backward-eval")


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_passes_on_each_operator_with_the_cpu_kernels(case):
    op, args = _opcheck_cases("cpu")[case]
    report = torch.library.opcheck(op, args)
    assert set(report.values()) == {"SUCCESS"}, report


@deep_only
def test_opcheck_passes_on_each_operator_with_the_cuda_kernels():
    from bnlab.kernels import backend

    backend.cuda_module()  # the simulator unless a GPU is present
    from bnlab.kernels import cuda

    device = "cpu" if cuda.SIMULATOR else "cuda"  # the simulator works on host tensors
    cases = _opcheck_cases("cuda", device)
    assert set(cases) == set(OPCHECK_CASES)
    for case, (op, args) in cases.items():
        report = torch.library.opcheck(op, args)
        assert set(report.values()) == {"SUCCESS"}, (case, report)


def test_the_fake_statistics_have_the_dtype_the_kernels_return():
    """Shapes and dtypes are all a compiled graph knows of an output before it runs."""
    x = torch.randn(6, 3, dtype=torch.float32)
    real = ops.batch_norm_train(x, None, None, None, None, 0.1, None, 1e-5, "cpu")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = ops.batch_norm_train(
            mode.from_tensor(x), None, None, None, None, 0.1, None, 1e-5, "cpu"
        )
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


# --- torch.compile(model, fullgraph=True) against eager mode


def _conv_model(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(4, 2, 1))


def _conv1d_model(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), bn, nn.ReLU(), nn.Conv1d(4, 2, 1))


def _mlp(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 2))


def _compare_compiled_with_eager(model, shape, fmt, backend, modes):
    """Steps of forward + backward in each mode, eager and compiled side by side; returns
    the graphs Dynamo captured (one per mode: a retrace at every step would show here)."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend=recording)
    g = torch.Generator().manual_seed(1)
    for training in modes:
        x = (torch.randn(shape, generator=g) * 2 + 1).contiguous(memory_format=fmt)
        outputs = []
        for m, run in ((model, model), (twin, compiled)):
            m.train(training).zero_grad()
            y = run(x)
            y.square().sum().backward()
            outputs.append(y)
        torch.testing.assert_close(outputs[1], outputs[0])
        for (name, p), (_, q) in zip(
            model.named_parameters(), twin.named_parameters(), strict=True
        ):
            torch.testing.assert_close(q.grad, p.grad, msg=f"gradient of {name}")
        for (name, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
            torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)  # running stats, count
    return graphs


def _kernel_ops_in(graphs) -> set[str]:
    return {
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and "bnlab" in str(node.target)
    }


def test_compiled_model_trains_as_eager_with_the_kernel_operator_in_its_graph():
    torch.manual_seed(0)
    model = _conv_model(A.BatchNorm2d(4))
    shape, layout = (4, 3, 5, 5), torch.channels_last
    graphs = _compare_compiled_with_eager(model, shape, layout, "aot_eager", modes=(True, True))
    assert len(graphs) == 1  # one graph for every training step: nothing forces a retrace
    assert _kernel_ops_in(graphs) == {"bnlab.batch_norm_train.default"}
    assert model[1].num_batches_tracked.item() == 2  # and the twin's equals it (above)


# The matrix: make test-deep, under both backends (inductor compiles take seconds each).
MATRIX = {
    "2d-nchw": (lambda: _conv_model(A.BatchNorm2d(4)), (4, 3, 5, 5), torch.contiguous_format),
    "2d-channels_last": (lambda: _conv_model(A.BatchNorm2d(4)), (4, 3, 5, 5), torch.channels_last),
    "1d-2d_input": (lambda: _mlp(A.BatchNorm1d(4)), (8, 3), torch.contiguous_format),
    "1d-3d_input": (lambda: _conv1d_model(A.BatchNorm1d(4)), (4, 3, 7), torch.contiguous_format),
    "momentum_none": (
        lambda: _conv_model(A.BatchNorm2d(4, momentum=None)),
        (4, 3, 5, 5),
        torch.channels_last,
    ),
    "not_affine": (
        lambda: _conv_model(A.BatchNorm2d(4, affine=False)),
        (4, 3, 5, 5),
        torch.contiguous_format,
    ),
    "not_tracking": (
        lambda: _mlp(A.BatchNorm1d(4, track_running_stats=False)),
        (8, 3),
        torch.contiguous_format,
    ),
}


@deep_only
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", list(MATRIX))
def test_compiled_models_train_and_evaluate_as_eager(case, backend):
    make, shape, fmt = MATRIX[case]
    torch.manual_seed(0)
    model = make()
    graphs = _compare_compiled_with_eager(model, shape, fmt, backend, modes=(True, True, False))
    assert len(graphs) == 2  # one for training (every step), one for eval
    # eval without running statistics normalizes with the batch's, as training does
    evaluate = "train" if model[1].running_mean is None else "eval"
    want = {"bnlab.batch_norm_train.default", f"bnlab.batch_norm_{evaluate}.default"}
    assert _kernel_ops_in(graphs) == want


@deep_only
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_bn_relu_equals_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    w, b = torch.rand(3, generator=g), torch.randn(3, generator=g)
    fn = torch.compile(
        lambda x: A.batch_norm_relu(x, rm, rv, w, b), fullgraph=True, backend=backend
    )
    with torch.no_grad():
        got, want = fn(x), A.batch_norm_relu(x, rm, rv, w, b)
    assert got.stride() == want.stride() and (want == 0).any() and (want > 0).any()
    torch.testing.assert_close(got, want)
