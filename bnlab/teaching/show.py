"""Show real code and real numbers in a notebook, so notebooks never copy either.

- :func:`show_source`: bnlab's (or torch's) source of a function or class, highlighted;
- :func:`source`, with ``docstring=False`` the code without its docstring, and
  :func:`statement`, one named assignment of a function: found by parsing, not by slicing
  text at fixed places, so they keep working when a library's source changes around them;
- :func:`compare`: Karpathy's makemore check of two tensors: exact, close, largest difference;
- :func:`compare_training`: a module and its reference trained side by side, step by step;
- :func:`outcome`: what a call returns, or the error it raises, as one line;
- :func:`holds`: a checked claim as one sentence below the output it checks.

Serves notebooks 02, 03, 04 and 07.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterable

import torch
from torch import nn


def _source_lines(obj) -> list[str]:
    try:
        return textwrap.dedent(inspect.getsource(obj)).splitlines(keepends=True)
    except (OSError, TypeError) as err:
        raise TypeError(f"cannot show the source of {obj!r}: {err}") from err


def _definition(lines: list[str]) -> ast.FunctionDef | ast.ClassDef:
    node = ast.parse("".join(lines)).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        raise TypeError("source() shows functions, methods and classes")
    return node


def source(obj, docstring: bool = True) -> str:
    """The source code of a function, class or method, dedented.

    docstring=False leaves out the docstring (located by parsing the code), which keeps a
    long library docstring from hiding the few lines a lesson is about.
    """
    lines = _source_lines(obj)
    if not docstring:
        body = _definition(lines).body
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
            if isinstance(first.value.value, str):
                del lines[first.lineno - 1 : first.end_lineno]
    return "".join(lines)


def statement(obj, name: str) -> str:
    """The source of the assignment to ``name`` in the body of function ``obj``.

    Raises LookupError, naming the function, when this version of it assigns no ``name``.
    """
    lines = _source_lines(obj)
    for node in ast.walk(_definition(lines)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
    where = f"{obj.__module__}.{obj.__qualname__}"
    raise LookupError(f"{where} assigns no {name!r} in this version of its library")


def show_source(*objs, docstring: bool = True) -> None:
    """Display the source of each object as a highlighted code block, with its location."""
    from IPython.display import Markdown, display

    for obj in objs:
        where = f"{obj.__module__}.{obj.__qualname__}"
        display(Markdown(f"`{where}`\n```python\n{source(obj, docstring)}```"))


def compare(
    name: str, ours: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12
) -> float:
    """Print whether ``ours`` equals ``reference`` exactly, approximately, and by how much.

    Karpathy's check from "makemore part 4" (building BN's backward by hand), one line per
    tensor. Returns the largest absolute difference.
    """
    exact = torch.equal(ours, reference)
    approx = torch.allclose(ours, reference, rtol=rtol, atol=atol)
    maxdiff = (ours - reference).abs().max().item()
    print(
        f"{name:8s} | exact: {str(exact):5s} | approximate: {str(approx):5s} "
        f"| maxdiff: {maxdiff:.2e}"
    )
    return maxdiff


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare_training(
    ours: nn.Module, reference: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    lr: float = 0.1,
) -> list[dict[str, float]]:  # fmt: skip
    """Train two modules side by side with SGD; after each step, how far apart they are.

    batches: (x, upstream gradient) pairs; each step backpropagates that gradient from
    the output (the loss sum(y * g)) and takes one ``bnlab.train.train_step`` per module.
    Returns one dict per step: max |difference| of the outputs ("output"), the input
    gradients ("dx"), each parameter's gradient ("d<name>") and each floating buffer.
    """
    from bnlab.experiments.train import train_step

    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in (ours, reference)]
    rows = []
    for x, grad in batches:
        inputs = [x.detach().clone().requires_grad_() for _ in range(2)]
        outputs = [
            train_step(m, opt, xi, grad, lambda y, g: (y * g).sum())[1]
            for m, opt, xi in zip((ours, reference), optimizers, inputs, strict=True)
        ]
        row = {"output": _max_diff(*outputs), "dx": _max_diff(inputs[0].grad, inputs[1].grad)}
        pairs = zip(ours.named_parameters(), reference.named_parameters(), strict=True)
        row |= {f"d{n}": _max_diff(p.grad, q.grad) for (n, p), (_, q) in pairs}
        pairs = zip(ours.named_buffers(), reference.named_buffers(), strict=True)
        row |= {n: _max_diff(b, c) for (n, b), (_, c) in pairs if b.is_floating_point()}
        rows.append(row)
    return rows


def outcome(fn: Callable[[], object], width: int = 70) -> object:
    """``fn()``'s result, or ``"ErrorType: message"`` (cut to ``width``) if it raises."""
    try:
        return fn()
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:width]}"


def holds(condition: object, claim: str) -> None:
    """State a checked claim as a sentence: print "✓ claim", or raise AssertionError(claim).

    A notebook's evidence reads as prose under the output it checks, one line per claim::

        holds(abs(mean) < 1e-6, "each channel's mean is 0 to float rounding")

    ``condition`` is anything with a truth value (a bool, a one-element tensor).
    """
    if not bool(condition):
        raise AssertionError(f"does not hold: {claim}")
    print(f"✓ {claim}")
