"""bnlab.nn.reference: the one-screen BatchNorm equals bnlab.nn.modules' and torch.nn's."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from torch import nn

from bnlab.nn import modules, reference
from bnlab.teaching import check

TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
OURS = {
    2: modules.BatchNorm1d,
    3: modules.BatchNorm1d,
    4: modules.BatchNorm2d,
    5: modules.BatchNorm3d,
}
SHAPES = [(8, 3), (5, 4, 7), (4, 3, 5, 6), (2, 3, 3, 4, 5)]
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def _pair(kind: str, shape, dtype):
    """(reference.BatchNorm, the other layer) with the same random weight and bias."""
    other = (TORCH if kind == "torch" else OURS)[len(shape)](shape[1], momentum=0.2, dtype=dtype)
    with torch.no_grad():
        other.weight.uniform_(0.5, 1.5)
        other.bias.uniform_(-0.5, 0.5)
    ours = reference.BatchNorm(shape[1], momentum=0.2).to(dtype)
    ours.load_state_dict(other.state_dict())  # the same keys as torch's
    return ours, other


def _step(module, x, grad):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("kind", ["torch", "modules"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_reference_trains_and_evaluates_like_the_hardened_layers(kind, dtype, shape):
    gen = torch.Generator().manual_seed(len(shape))
    ours, other = _pair(kind, shape, dtype)
    for step in range(4):  # three training steps, then eval mode
        if step == 3:
            ours.eval()
            other.eval()
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1.5
        grad = torch.randn(shape, generator=gen, dtype=dtype)
        for a, b in zip(_step(ours, x, grad), _step(other, x, grad), strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])
        for name in ("weight", "bias"):
            a, b = getattr(ours, name), getattr(other, name)
            torch.testing.assert_close(a.grad, b.grad, **TOL[dtype])
            a.grad = b.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(other, name), **TOL[dtype])
    assert ours.num_batches_tracked == 3


def test_the_functions_pass_the_notebooks_checkers():
    assert check.check_forward(reference.bn_forward).passed
    assert check.check_forward(reference.bn_forward, ndim=2).passed
    assert check.check_backward(reference.bn_backward, forward=reference.bn_forward).passed
    assert check.check_running_stats(reference.update_running).passed
    assert check.check_running_stats(reference.BatchNorm(3).double()).passed


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_backward_is_autograds_through_the_forward(shape):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 - 1
    gamma = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    reference.bn_forward(*leaves, 1e-5)[0].backward(dy)
    grads = reference.bn_backward(dy, reference.bn_forward(x, gamma, beta, 1e-5)[1])
    for ours, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(ours, leaf.grad, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, g, b: reference.BNFunction.apply(x, g, b, 1e-5), tuple(leaves)
    )


def test_the_reference_fits_on_one_screen():
    """At most 40 lines of code (docstrings, comments and blank lines aside), no validation."""
    text = inspect.getsource(reference)
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    code = [
        line
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docstrings
    ]
    assert len(code) <= 40, len(code)
    assert len(text.splitlines()) <= 70
    assert "raise" not in text and "validate" not in text
