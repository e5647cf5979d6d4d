"""Checkers for learners' Batch Normalization code: pass, or which typical mistake.

Each checker runs the learner's code on an input built to tell the mistakes apart,
compares the result with the reference (``bnlab.nn.functional``) and with *mistake
variants*, references with one typical mistake built in. The closest variant that
matches names the diagnosis; no match is a generic failure.

- :func:`check_forward`  ``fn(x, gamma, beta, eps) -> out`` or ``(out, cache)``
- :func:`check_backward` ``fn(dout, cache) -> (dx, dgamma, dbeta)``
- :func:`check_running_stats` a module with running buffers, or
  ``step(x, running_mean, running_var, momentum)`` updating the buffers in place.

One catalogue of typical mistakes serves every checker of the course (these and
:mod:`bnlab.teaching.exercises`'): a mistake has one name and one hint (:data:`_HINTS`),
and :func:`bn_variants`, :func:`dx_variants` and :func:`standardize` build it into BN,
its input gradient, and any normalization, so that a checker whose function normalizes
names the same mistakes (unbiased variance, eps outside the root or missing or
hard-coded, wrong axes, gamma or beta dropped). A result that matches none of them fails
with where it differs (which output and channel) and the notebook section to reread.

Why the inputs look as they do: a small batch (m = 16 values per channel, or 4 for
running statistics) makes the factor m / (m - 1) of an unbiased variance visible; a
channel with std 0.01 and eps = 1e-3 makes sqrt(var + eps) and sqrt(var) + eps differ
by a factor 3; channels and samples with different means make every wrong set of
reduction axes give a different answer.

Serves notebook 03.
"""

from __future__ import annotations

import copy
import sys
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
EPS_HARD_CODED = "eps hard-coded to 1e-5 instead of the eps passed in"
GAMMA_MISSING = "gamma dropped: the normalized value is not scaled by gamma"
BETA_MISSING = "beta dropped: nothing is added after scaling by gamma"
DGAMMA_WITHOUT_XHAT = "dgamma sums dout instead of dout * xhat"
DPARAMS_AVERAGED = "dgamma or dbeta averaged over the batch instead of summed"
STATS_AS_CONSTANTS = "backward treats mean and var as constants"
MISSING_MEAN_PATH = "backward misses the gradient through the mean"
MISSING_VAR_PATH = "backward misses the gradient through the variance"
MISSING_RUNNING_UPDATE = "missing running-stat update"
KERAS_MOMENTUM = "momentum applied to the old value (Keras convention)"
BIASED_RUNNING_VAR = "running variance stores the biased variance"
RUNNING_OVERWRITTEN = "running stats overwritten by the last batch (no averaging)"
RUNNING_REBOUND = "running buffers rebound to new tensors instead of updated in place"

#: the eps a function that ignores its eps argument usually hard-codes (torch's default)
DEFAULT_EPS = 1e-5

_HINTS = {
    UNBIASED_VARIANCE: "normalize with the biased variance, mean((x - mean)**2): unbiased=False",
    AXES_BATCH_ONLY: "for (N, C, H, W) input reduce over (0, 2, 3): one statistic per channel",
    AXES_ALL: "keep the channel axis: reduce over (0, 2, 3), not over every axis",
    AXES_PER_SAMPLE: "BN reduces over the batch too: (0,) for (N, C), (0, 2, 3) for "
    "(N, C, H, W); per-sample statistics are layer or instance norm",
    EPS_OUTSIDE_SQRT: "add eps to the variance, then take the root: sqrt(var + eps)",
    EPS_MISSING: "add eps to the variance before the square root: sqrt(var + eps)",
    EPS_HARD_CODED: "use the eps argument: the check passes one other than 1e-5",
    GAMMA_MISSING: "scale the normalized value by gamma (one per channel) before adding beta",
    BETA_MISSING: "add beta (one per channel) after scaling by gamma",
    DGAMMA_WITHOUT_XHAT: "out = gamma * xhat + beta, so dgamma = sum(dout * xhat) over "
    "every axis but the channel axis",
    DPARAMS_AVERAGED: "gamma and beta are shared by every value of a channel: their gradients "
    "are sums over every axis but the channel axis, not means",
    STATS_AS_CONSTANTS: "the mean and the variance depend on every x too: add the gradient "
    "that reaches x through mu and the one through sigma^2 (the figure's two curved paths)",
    MISSING_MEAN_PATH: "the path through the mean is missing: mu depends on every x",
    MISSING_VAR_PATH: "the path through the variance is missing: sigma^2 depends on every x",
    MISSING_RUNNING_UPDATE: "in training, update running_mean and running_var (in place) after "
    "each batch",
    KERAS_MOMENTUM: "PyTorch weighs the NEW value: running = (1 - momentum) * running "
    "+ momentum * batch (see bnlab.functional.convert_momentum)",
    BIASED_RUNNING_VAR: "store the unbiased variance: var * m / (m - 1)",
    RUNNING_OVERWRITTEN: "average: running = (1 - momentum) * running + momentum * batch",
    RUNNING_REBOUND: "`running_mean = ...` makes a new local tensor and leaves the buffer as it "
    "was: update the tensor you were given, running_mean.mul_(1 - momentum).add_(momentum * "
    "mean) (or running_mean.copy_(...))",
}


def reread(section: str) -> str:
    """The fallback's pointer: the notebook section (its heading's text) to reread."""
    return f"reread the section “{section}” and compare your code with its formula"


# Where each of notebook 03's exercises is taught (the headings' text, without numbers)
FORWARD_SECTION = "The forward, by you"
BACKWARD_SECTION = "The backward, by you"
RUNNING_SECTION = "The running statistics, by you"


@dataclass
class CheckResult:
    """Outcome of a check: ``passed``, the diagnosed ``mistake`` (or None), a message.

    ``show_diff=False`` leaves the distance to the reference out of the printed result, for
    a checker whose answer would follow from it (a byte count: answer = got - diff).
    """

    passed: bool
    mistake: str | None
    message: str
    max_abs_diff: float
    show_diff: bool = True

    def __repr__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        what = f" [{self.mistake}]" if self.mistake else ""
        if not self.show_diff:
            return f"{verdict}{what}: {self.message}"
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


#: the mistakes of a normalization (x - mean) / sqrt(var + eps) itself
NORMALIZE_MISTAKES = (UNBIASED_VARIANCE, EPS_OUTSIDE_SQRT, EPS_MISSING, EPS_HARD_CODED)


def standardize(x: Tensor, dims, eps: float, mistake: str | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), or with one of
    :data:`NORMALIZE_MISTAKES` built in; differentiable."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=mistake == UNBIASED_VARIANCE)
    if mistake == EPS_OUTSIDE_SQRT:
        std = var.sqrt() + eps
    elif mistake == EPS_MISSING:
        std = var.sqrt()
    else:
        std = (var + (DEFAULT_EPS if mistake == EPS_HARD_CODED else eps)).sqrt()
    return (x - mean) / std


def wrong_axes(x: Tensor) -> dict[str, tuple[int, ...]]:
    """The wrong reduction axes for BN of ``x``, by mistake: every axis, per sample, and
    (for (N, C, H, W)) the batch axis only."""
    axes = {
        AXES_ALL: tuple(range(x.dim())),
        AXES_PER_SAMPLE: tuple(range(1 if x.dim() == 2 else 2, x.dim())),
    }
    if x.dim() > 2:  # for (N, C) input, (0,) is the right set of axes
        axes[AXES_BATCH_ONLY] = (0,)
    return axes


def _bn(x, gamma, beta, eps, mistake: str | None = None) -> Tensor:
    """BN's training forward, or with one mistake of the catalogue built in."""
    dims = wrong_axes(x).get(mistake, F.reduce_dims(x))
    xhat = standardize(x, dims, eps, mistake if mistake in NORMALIZE_MISTAKES else None)
    g = 1.0 if mistake == GAMMA_MISSING else F.per_channel(gamma, x)
    b = 0.0 if mistake == BETA_MISSING else F.per_channel(beta, x)
    return g * xhat + b


def _forward_mistakes(x: Tensor) -> tuple[str, ...]:
    return (*NORMALIZE_MISTAKES, *wrong_axes(x), GAMMA_MISSING, BETA_MISSING)


def bn_variants(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> dict[str, Tensor]:
    """BN's training output with each typical forward mistake built in, by mistake."""
    return {m: _bn(x, gamma, beta, eps, m) for m in _forward_mistakes(x)}


def dx_variants(dout: Tensor, x: Tensor, gamma: Tensor, eps: float) -> dict[str, Tensor]:
    """BN's input gradient with each typical mistake built in, by mistake: the forward's
    (through autograd, a dropped beta aside: it leaves dx alone) and the backward's own
    (the statistics treated as constants, a path through them missing)."""
    variants = {}
    for mistake in _forward_mistakes(x):
        if mistake == BETA_MISSING:
            continue
        xg = x.detach().clone().requires_grad_(True)
        out = _bn(xg, gamma, torch.zeros_like(gamma), eps, mistake)
        (variants[mistake],) = torch.autograd.grad(out, xg, dout)
    xhat = standardize(x, F.reduce_dims(x), eps)
    ivar = (x.var(dim=F.reduce_dims(x), keepdim=True, unbiased=False) + eps).rsqrt()
    g, dims = F.per_channel(gamma, x), F.reduce_dims(x)
    mean_dout = dout.mean(dim=dims, keepdim=True)
    mean_dout_xhat = (dout * xhat).mean(dim=dims, keepdim=True)
    variants[STATS_AS_CONSTANTS] = g * ivar * dout
    variants[MISSING_MEAN_PATH] = g * ivar * (dout - xhat * mean_dout_xhat)
    variants[MISSING_VAR_PATH] = g * ivar * (dout - mean_dout)
    return variants


def _dparam_variants(dout: Tensor, x: Tensor, eps: float, which: str) -> dict[str, Tensor]:
    """dgamma (``which`` "dgamma") or dbeta with each typical mistake built in."""
    dims = F.reduce_dims(x)
    grad = dout * standardize(x, dims, eps) if which == "dgamma" else dout
    variants = {
        DPARAMS_AVERAGED: grad.mean(dim=dims),
        AXES_ALL: grad.sum(),
    }
    if x.dim() > 2:
        variants[AXES_BATCH_ONLY] = grad.sum(dim=0)
    if which == "dgamma":
        variants[DGAMMA_WITHOUT_XHAT] = dout.sum(dim=dims)
    return variants


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


def _max_diff(a: Tensor, b: Tensor, scale: Tensor | float = 1.0) -> float:
    return ((a.detach().to(torch.float64) - b.to(torch.float64)) / scale).abs().max().item()


#: a result in float32 from float64 inputs is compared to this relative tolerance instead
FLOAT32_RTOL = 1e-5


def _tolerance(got: Tensor, reference: Tensor, tol: float, scale) -> float:
    """``tol``, or float32's rounding when ``got`` is float32: a right answer computed in
    float32 passes (none of the course's checks needs float64's precision)."""
    if got.dtype != torch.float32:
        return tol
    size = (reference.to(torch.float64) / scale).abs().max().item() if reference.numel() else 1.0
    return max(tol, FLOAT32_RTOL * max(1.0, size))


def _describe(index: tuple[int, ...], shape: tuple[int, ...], labels) -> str:
    """Where an element of a result sits: 'var, channel 2', 'channel 1 of sample 3'."""
    if labels is not None and len(shape) >= 1 and shape[0] == len(labels):
        head, rest = labels[index[0]], index[1:]
        return head if not rest else f"{head}, channel {rest[0]}"
    if len(shape) == 1:
        return f"channel {index[0]}"
    if len(shape) >= 2:
        return f"channel {index[1]} of sample {index[0]}"
    return "the value"


def where_it_differs(got: Tensor, reference: Tensor, scale=1.0, labels=None, describe=None) -> str:
    """Which output and channel of ``got`` differ most from ``reference``, with both values."""
    diff = ((got.detach().to(torch.float64) - reference.to(torch.float64)) / scale).abs()
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(diff.shape)))
    place = (describe or (lambda i: _describe(i, tuple(diff.shape), labels)))(index)
    value, want = got.detach().to(torch.float64)[index].item(), reference[index].item()
    return f"it differs most at {place} (got {value:.6g}, expected {want:.6g})"


def _shape_message(what: str, got: Tensor, reference: Tensor, labels) -> str:
    if labels is not None and got.dim() >= 1 and got.shape[0] == reference.shape[0] == len(labels):
        names = " and ".join(labels) if len(labels) == 2 else ", ".join(labels)
        return (
            f"{names} have shape {tuple(got.shape[1:])} each, expected "
            f"{tuple(reference.shape[1:])} (one value per channel)"
        )
    return f"{what} has shape {tuple(got.shape)}, expected {tuple(reference.shape)}"


def _diagnose(
    got: Tensor,
    reference: Tensor,
    variants: dict[str, Tensor],
    what: str,
    tol: float,
    hints: dict[str, str] | None = None,
    fallback: str = reread(FORWARD_SECTION),
    labels: tuple[str, ...] | None = None,
    scale: Tensor | float = 1.0,
    describe: Callable[[tuple[int, ...]], str] | None = None,
) -> CheckResult:
    """Pass, the mistake variant ``got`` matches (its hint from ``hints``), or a failure
    that says where ``got`` differs most and ends with ``fallback`` (the section to reread).

    ``labels`` name the entries of a stacked result's first axis ("mean", "var");
    ``scale`` makes the comparison relative (differences are divided by it); ``describe``
    names the place of an element index, where the default (channel and sample) does not
    fit. A result of the wrong shape can still match a variant of that shape (wrong axes
    give wrong shapes); a float32 result is compared at float32's precision. Shared with
    :mod:`bnlab.teaching.exercises`.
    """
    hints = _HINTS if hints is None else hints
    tol = _tolerance(got, reference, tol, scale)
    same_shape = {n: v for n, v in variants.items() if tuple(v.shape) == tuple(got.shape)}
    if tuple(got.shape) != tuple(reference.shape):
        diff = float("inf")
        message = _shape_message(what, got, reference, labels)
    else:
        diff = _max_diff(got, reference, scale)
        if diff <= tol:
            precision = " to float32 precision" if got.dtype == torch.float32 else ""
            return CheckResult(True, None, f"{what} matches the reference{precision}", diff)
        where = where_it_differs(got, reference, scale, labels, describe)
        message = f"{what} differs from the reference and matches none of the typical "
        message += f"mistakes: {where}; {fallback}"
    scores = {name: _max_diff(got, v, scale) for name, v in same_shape.items()}
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
    return _diagnose(got, reference, bn_variants(x, gamma, beta, eps), "forward output", tol)


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
    try:
        grads = [torch.as_tensor(g) for g in grads]
    except (TypeError, ValueError, RuntimeError) as err:
        return CheckResult(False, None, f"backward returned a non-tensor: {err}", float("inf"))
    fallback = reread(BACKWARD_SECTION)
    checks = [
        _diagnose(
            grads[i], ref[i], _dparam_variants(dout, x, eps, name), name, tol, fallback=fallback
        )
        for i, name in ((1, "dgamma"), (2, "dbeta"))
    ]
    checks.append(
        _diagnose(grads[0], ref[0], dx_variants(dout, x, gamma, eps), "dx", tol, fallback=fallback)
    )
    failed = [c for c in checks if not c.passed]
    if not failed:
        worst = max(c.max_abs_diff for c in checks)
        return CheckResult(True, None, "dx, dgamma and dbeta match the reference", worst)
    named = [c for c in failed if c.mistake]
    return named[0] if named else failed[0]


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


def _rebinds(fn: Callable, x: Tensor, momentum: float) -> bool:
    """Whether ``fn(x, running_mean, running_var, momentum)`` binds a new tensor to its
    running_mean or running_var parameter (``running_mean = ...``) instead of updating the
    tensor it was given: its locals are read when it returns (``sys.setprofile``)."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_argcount < 3:
        return False
    rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    names = code.co_varnames[1:3]
    seen: dict = {}

    def profile(frame, event, _arg):
        if event == "return" and frame.f_code is code:
            seen.update({n: frame.f_locals.get(n) for n in names})

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn(x.clone(), rm, rv, momentum)
    except Exception:  # the learner's code; check_running_stats reports what it raised
        return False
    finally:
        sys.setprofile(previous)
    return any(n in seen and seen[n] is not given for n, given in zip(names, (rm, rv), strict=True))


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
    if (
        _max_diff(got, ref) > tol
        and not isinstance(step, nn.Module)
        and _rebinds(fn, batches[0], momentum)
    ):
        message = "the buffers you were given did not change: new tensors were bound to "
        message += f"their names instead of updating them in place. Hint: {_HINTS[RUNNING_REBOUND]}"
        return CheckResult(False, RUNNING_REBOUND, message, _max_diff(got, ref))
    variants = {
        name: torch.cat(_running_reference(batches, momentum, name))
        for name in (
            MISSING_RUNNING_UPDATE,
            KERAS_MOMENTUM,
            BIASED_RUNNING_VAR,
            RUNNING_OVERWRITTEN,
        )
    }
    got, ref = got.reshape(2, -1), ref.reshape(2, -1)
    variants = {name: v.reshape(2, -1) for name, v in variants.items()}
    what = f"(running_mean, running_var) after {steps} steps"
    return _diagnose(
        got,
        ref,
        variants,
        what,
        tol,
        fallback=reread(RUNNING_SECTION),
        labels=("running_mean", "running_var"),
    )
