"""Checkers for learners' Batch Normalization code: pass, or which typical mistake.

Each checker runs the learner's code on an input built to tell the mistakes apart,
compares the result with the reference (``bnlab.nn.functional``) and with *mistake
variants*, references with one typical mistake built in. The closest variant that
matches names the diagnosis; no match is a generic failure.

- :func:`check_forward`  ``fn(x, gamma, beta, eps) -> out`` or ``(out, cache)``
- :func:`check_backward` ``fn(dout, cache) -> (dx, dgamma, dbeta)``
- :func:`check_running_stats` a module with running buffers, or
  ``step(x, running_mean, running_var, momentum)`` updating the buffers in place.

Why the inputs look as they do: a small batch (m = 16 values per channel, or 4 for
running statistics) makes the factor m / (m - 1) of an unbiased variance visible; a
channel with std 0.01 and eps = 1e-3 makes sqrt(var + eps) and sqrt(var) + eps differ
by a factor 3; channels and samples with different means make every wrong set of
reduction axes give a different answer.

Serves notebook 03.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlab.nn import functional as F

# Mistake names, as reported in CheckResult.mistake.
UNBIASED_VARIANCE = "unbiased variance in normalization"
AXES_BATCH_ONLY = "wrong reduction axes: (0,) only"
AXES_ALL = "wrong reduction axes: all axes, the channel axis too"
AXES_PER_SAMPLE = "wrong reduction axes: per sample (2, 3)"
EPS_OUTSIDE_SQRT = "eps outside the square root: sqrt(var) + eps"
EPS_MISSING = "eps missing: divides by sqrt(var)"
STATS_AS_CONSTANTS = "backward treats mean and var as constants"
MISSING_MEAN_PATH = "backward misses the gradient through the mean"
MISSING_VAR_PATH = "backward misses the gradient through the variance"
MISSING_RUNNING_UPDATE = "missing running-stat update"
KERAS_MOMENTUM = "momentum applied to the old value (Keras convention)"
BIASED_RUNNING_VAR = "running variance stores the biased variance"
RUNNING_OVERWRITTEN = "running stats overwritten by the last batch (no averaging)"

_HINTS = {
    UNBIASED_VARIANCE: "normalize with the biased variance, mean((x - mean)**2): unbiased=False",
    AXES_BATCH_ONLY: "for (N, C, H, W) input reduce over (0, 2, 3): one statistic per channel",
    AXES_ALL: "keep the channel axis: reduce over (0, 2, 3), not over every axis",
    AXES_PER_SAMPLE: "BN reduces over the batch too: (0, 2, 3); (2, 3) is instance norm",
    EPS_OUTSIDE_SQRT: "add eps to the variance, then take the root: sqrt(var + eps)",
    EPS_MISSING: "add eps to the variance before the square root: sqrt(var + eps)",
    STATS_AS_CONSTANTS: "mean and var depend on x: dx = g/std * (dout - mean(dout) "
    "- xhat * mean(dout * xhat))",
    MISSING_MEAN_PATH: "subtract mean(dout): the mean depends on every x",
    MISSING_VAR_PATH: "subtract xhat * mean(dout * xhat): the variance depends on every x",
    MISSING_RUNNING_UPDATE: "in training, update running_mean and running_var after each batch",
    KERAS_MOMENTUM: "PyTorch weighs the NEW value: running = (1 - momentum) * running "
    "+ momentum * batch (see bnlab.functional.convert_momentum)",
    BIASED_RUNNING_VAR: "store the unbiased variance: var * m / (m - 1)",
    RUNNING_OVERWRITTEN: "average: running = (1 - momentum) * running + momentum * batch",
}


@dataclass
class CheckResult:
    """Outcome of a check: ``passed``, the diagnosed ``mistake`` (or None), a message."""

    passed: bool
    mistake: str | None
    message: str
    max_abs_diff: float

    def __repr__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        what = f" [{self.mistake}]" if self.mistake else ""
        return (
            f"{verdict}{what}: {self.message} (max |diff| vs reference = {self.max_abs_diff:.3g})"
        )

    def __bool__(self) -> bool:
        return self.passed


# ---------------------------------------------------------------------------------
# Inputs that separate the mistakes
# ---------------------------------------------------------------------------------


def _forward_input(ndim: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, float]:
    """x (4, 3, 2, 2) (or (16, 3) for ndim=2) in float64, gamma, beta, eps = 1e-3.

    Channel means differ (so (0,1,2,3) and (0,) show), every sample has its own offset
    (so per-sample (2,3) shows), and channel 2 has std 0.01 (so eps placement shows).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (4, 3, 2, 2) if ndim == 4 else (16, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.0, 3.0, 0.01], dtype=torch.float64)
    shift = torch.tensor([0.5, -2.0, 4.0], dtype=torch.float64)
    x = x * F.per_channel(scale, x) + F.per_channel(shift, x)
    if ndim == 4:  # a per-sample offset, so that statistics over (2, 3) differ from BN's
        x = x + torch.arange(shape[0], dtype=torch.float64).reshape(-1, 1, 1, 1) * 0.3 * (
            F.per_channel(scale, x)
        )
    gamma = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64)
    beta = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64)
    return x, gamma, beta, 1e-3


# ---------------------------------------------------------------------------------
# Mistake variants (private): the reference with one mistake built in
# ---------------------------------------------------------------------------------


def _normalize(x, gamma, beta, eps, dims, unbiased=False, eps_mode="inside") -> Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=unbiased)
    if eps_mode == "inside":
        std = torch.sqrt(var + eps)
    elif eps_mode == "outside":
        std = torch.sqrt(var) + eps
    else:
        std = torch.sqrt(var)
    return F.per_channel(gamma, x) * (x - mean) / std + F.per_channel(beta, x)


def _forward_variants(x, gamma, beta, eps) -> dict[str, Tensor]:
    dims = F.reduce_dims(x)
    variants = {
        UNBIASED_VARIANCE: _normalize(x, gamma, beta, eps, dims, unbiased=True),
        EPS_OUTSIDE_SQRT: _normalize(x, gamma, beta, eps, dims, eps_mode="outside"),
        EPS_MISSING: _normalize(x, gamma, beta, eps, dims, eps_mode="none"),
        AXES_ALL: _normalize(x, gamma, beta, eps, tuple(range(x.dim()))),
    }
    if x.dim() > 2:  # for (N, C) input, (0,) is the right set of axes
        variants[AXES_BATCH_ONLY] = _normalize(x, gamma, beta, eps, (0,))
        variants[AXES_PER_SAMPLE] = _normalize(x, gamma, beta, eps, tuple(range(2, x.dim())))
    return variants


def _backward_variants(dout: Tensor, cache: tuple) -> dict[str, Tensor]:
    xhat, g, _xmu, ivar, *_rest, dims = cache
    mean_dout = dout.mean(dim=dims, keepdim=True)
    mean_dout_xhat = (dout * xhat).mean(dim=dims, keepdim=True)
    return {
        STATS_AS_CONSTANTS: g * ivar * dout,
        MISSING_MEAN_PATH: g * ivar * (dout - xhat * mean_dout_xhat),
        MISSING_VAR_PATH: g * ivar * (dout - mean_dout),
    }


def _running_reference(batches, momentum, variant: str | None) -> tuple[Tensor, Tensor]:
    """Running mean and var after ``batches``, with PyTorch's rule or one mistake in it."""
    c = batches[0].shape[1]
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for x in batches:
        mean, var = F.batch_stats(x)
        m = x.numel() // c
        if variant == MISSING_RUNNING_UPDATE:
            continue
        if variant == BIASED_RUNNING_VAR:
            var = var * (m - 1) / m  # update_running_stats multiplies by m / (m - 1)
        if variant == KERAS_MOMENTUM:
            F.update_running_stats(rm, rv, mean, var, m, 1.0 - momentum)
        elif variant == RUNNING_OVERWRITTEN:
            F.update_running_stats(rm, rv, mean, var, m, 1.0)
        else:
            F.update_running_stats(rm, rv, mean, var, m, momentum)
    return rm, rv


# ---------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.detach().to(torch.float64) - b.to(torch.float64)).abs().max().item()


def _diagnose(
    got: Tensor,
    reference: Tensor,
    variants: dict[str, Tensor],
    what: str,
    tol: float,
    hints: dict[str, str] | None = None,
    fallback: str = "check it step by step against bnlab.functional.batchnorm_forward",
) -> CheckResult:
    """Pass, the mistake variant ``got`` matches (its hint from ``hints``), or a failure.

    A result of the wrong shape can still match a variant of that shape (wrong axes give
    wrong shapes); shared with :mod:`bnlab.teaching.exercises`.
    """
    hints = _HINTS if hints is None else hints
    same_shape = {n: v for n, v in variants.items() if tuple(v.shape) == tuple(got.shape)}
    if tuple(got.shape) != tuple(reference.shape):
        diff = float("inf")
        message = f"{what} has shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
    else:
        diff = _max_diff(got, reference)
        if diff <= tol:
            return CheckResult(True, None, f"{what} matches the reference", diff)
        message = f"{what} differs from the reference and matches none of the typical mistakes"
        message += f"; {fallback}"
    scores = {name: _max_diff(got, v) for name, v in same_shape.items()}
    name = min(scores, key=scores.get) if scores else None
    if name is not None and scores[name] <= tol:
        return CheckResult(False, name, f"{what} is wrong. Hint: {hints[name]}", diff)
    return CheckResult(False, None, message, diff)


def _call(fn: Callable, *args):
    """(fn(*args), None), or (None, a failed CheckResult) if the learner's code raised."""
    try:
        return fn(*args), None
    except NotImplementedError:
        name = getattr(fn, "__name__", "the function")
        return None, CheckResult(
            False, None, f"not attempted yet: {name} raises NotImplementedError", float("inf")
        )
    except Exception as err:  # the learner's code: report any exception as a failure
        return None, CheckResult(False, None, f"raised {type(err).__name__}: {err}", float("inf"))


# ---------------------------------------------------------------------------------
# Public checkers
# ---------------------------------------------------------------------------------


def check_forward(fn: Callable, ndim: int = 4, tol: float = 1e-6) -> CheckResult:
    """Check a training-mode forward ``fn(x, gamma, beta, eps) -> out | (out, cache)``.

    Inputs: ``ndim`` 4 tests (N, C, H, W) input, 2 tests (N, D) input (CS231n's layout).
    The input is float64; ``tol`` is the largest accepted absolute difference.
    """
    if ndim not in (2, 4):
        raise ValueError(f"ndim must be 2 or 4 (got {ndim!r})")
    x, gamma, beta, eps = _forward_input(ndim)
    got, error = _call(fn, x.clone(), gamma.clone(), beta.clone(), eps)
    if error is not None:
        return error
    if isinstance(got, tuple):
        got = got[0]
    if not isinstance(got, Tensor):
        return CheckResult(
            False, None, f"returned {type(got).__name__}, expected a tensor", float("inf")
        )
    reference, _ = F.batchnorm_forward(x, gamma, beta, eps)
    return _diagnose(got, reference, _forward_variants(x, gamma, beta, eps), "forward output", tol)


def check_backward(
    fn: Callable, forward: Callable | None = None, ndim: int = 4, tol: float = 1e-6
) -> CheckResult:
    """Check ``fn(dout, cache) -> (dx, dgamma, dbeta)`` against the compact backward.

    ``forward`` produces the cache ``fn`` expects (the learner's own forward); None uses
    :func:`bnlab.nn.functional.batchnorm_forward`'s cache. The forward is checked first.
    """
    forward = forward or F.batchnorm_forward
    if forward is not F.batchnorm_forward:
        fwd = check_forward(forward, ndim, tol)
        if not fwd.passed:
            return CheckResult(
                False, fwd.mistake, f"the forward is wrong first: {fwd.message}", fwd.max_abs_diff
            )
    x, gamma, beta, eps = _forward_input(ndim)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_cache = F.batchnorm_forward(x, gamma, beta, eps)[1]
    ref = F.batchnorm_backward_compact(dout, ref_cache)
    result, error = _call(forward, x.clone(), gamma.clone(), beta.clone(), eps)
    if error is not None:
        return error
    if not (isinstance(result, tuple) and len(result) == 2):
        return CheckResult(False, None, "the forward must return (out, cache)", float("inf"))
    grads, error = _call(fn, dout.clone(), result[1])
    if error is not None:
        return error
    if not (isinstance(grads, tuple) and len(grads) == 3):
        return CheckResult(False, None, "backward must return (dx, dgamma, dbeta)", float("inf"))
    checks = [
        _diagnose(grads[1], ref[1], {}, "dgamma", tol),
        _diagnose(grads[2], ref[2], {}, "dbeta", tol),
        _diagnose(grads[0], ref[0], _backward_variants(dout, ref_cache), "dx", tol),
    ]
    failed = [c for c in checks if not c.passed]
    if not failed:
        worst = max(c.max_abs_diff for c in checks)
        return CheckResult(True, None, "dx, dgamma and dbeta match the reference", worst)
    return failed[-1] if failed[-1].mistake else failed[0]


def _module_step(module: nn.Module) -> Callable:
    """Wrap a copy of ``module``, buffers reset, as ``step(x, running_mean, running_var, m)``."""
    module = copy.deepcopy(module)  # the learner's module keeps its state
    with torch.no_grad():
        module.running_mean.zero_()
        module.running_var.fill_(1.0)

    def step(x, running_mean, running_var, momentum):
        module.train()
        module(x.to(module.running_mean.dtype))
        running_mean.copy_(module.running_mean.detach())
        running_var.copy_(module.running_var.detach())

    return step


def check_running_stats(
    step: Callable | nn.Module, momentum: float = 0.1, steps: int = 3, tol: float = 1e-6
) -> CheckResult:
    """Check that training updates the running statistics as PyTorch does.

    ``step`` is a module (BatchNorm1d-like, 3 features, with ``running_mean`` and
    ``running_var`` buffers; its own ``momentum`` is used) or a function
    ``step(x, running_mean, running_var, momentum)`` that updates the (C,) buffers in
    place for one training batch x of shape (4, 3).
    """
    if isinstance(step, nn.Module):
        if (
            getattr(step, "running_mean", None) is None
            or getattr(step, "running_var", None) is None
        ):
            raise ValueError(
                "the module has no running_mean/running_var buffers; construct it with "
                "track_running_stats=True (register them with register_buffer)"
            )
        if hasattr(step, "momentum"):
            if step.momentum is None:
                raise ValueError(
                    "the module has momentum=None (cumulative average); construct it with a "
                    "number, e.g. momentum=0.1, to check the exponential running average"
                )
            momentum = float(step.momentum)
        if step.running_mean.dtype != torch.float64:
            tol = max(tol, 1e-5)  # a float32 module rounds at about 1e-7 relative
        fn = _module_step(step)
    else:
        fn = step
    F.validate_momentum(momentum)
    g = torch.Generator().manual_seed(2)
    shift = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    batches = [
        torch.randn(4, 3, generator=g, dtype=torch.float64) * 2 + shift for _ in range(steps)
    ]
    rm = torch.zeros(3, dtype=torch.float64)
    rv = torch.ones(3, dtype=torch.float64)
    for x in batches:
        _, error = _call(fn, x.clone(), rm, rv, momentum)
        if error is not None:
            return error
    got = torch.cat([rm, rv])
    ref = torch.cat(_running_reference(batches, momentum, None))
    variants = {
        name: torch.cat(_running_reference(batches, momentum, name))
        for name in (
            MISSING_RUNNING_UPDATE,
            KERAS_MOMENTUM,
            BIASED_RUNNING_VAR,
            RUNNING_OVERWRITTEN,
        )
    }
    return _diagnose(got, ref, variants, f"running (mean, var) after {steps} steps", tol)
