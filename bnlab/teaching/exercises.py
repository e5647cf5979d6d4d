"""The end-of-notebook exercises' checkers: pass, or which typical mistake.

Every course notebook ends with 2-4 exercises. Each checker here runs the learner's function
on inputs built to tell the typical mistakes apart, compares the result with a reference and
with *mistake variants* (the reference with one typical mistake built in), and returns a
:class:`bnlab.teaching.check.CheckResult` whose ``mistake`` is one of this module's constants
and whose message carries the hint. The comparison is :mod:`bnlab.teaching.check`'s own;
notebook 03's exercises are its :func:`~bnlab.teaching.check.check_forward`,
:func:`~bnlab.teaching.check.check_backward` and
:func:`~bnlab.teaching.check.check_running_stats`. A function that still raises
``NotImplementedError`` (the learner's stub) fails with "not attempted yet".

:data:`EXERCISES` lists every notebook's exercises; :func:`check_all` runs a namespace (a
solutions file, a notebook's globals) through them. The reference solutions are in
``solutions/NN_topic.py``, which CI runs through these checkers (``tests/teaching``).

The mistakes are one catalogue, :mod:`bnlab.teaching.check`'s: a checker whose function
normalizes names the same ones (unbiased variance, eps outside the root, missing or
hard-coded, wrong axes, gamma or beta dropped), and every check that takes an eps passes
one other than torch's default 1e-5. A result that matches no mistake fails with where it
differs and the section of the notebook to reread (:data:`SECTIONS`); a right answer in
float32 passes. :meth:`Exercise.run` finds the learner's ``my_<function>`` or
``<function>``.

Serves notebooks 01, 02, 03, 04, 05, 06, 07, 08 and 09.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from scipy import stats
from torch import Tensor, nn

from bnlab.nn import functional as F
from bnlab.nn.hooks import batchnorm_layers, layers, leaves
from bnlab.nn.modules import is_batchnorm
from bnlab.teaching import check
from bnlab.teaching.check import CheckResult, _call, _diagnose, _forward_input, reread

# ---------------------------------------------------------------------------------
# Mistake names, as reported in CheckResult.mistake
# ---------------------------------------------------------------------------------

# 01 concepts (and 02's identity_params), shared with notebook 03's checkers
UNBIASED_VARIANCE = check.UNBIASED_VARIANCE
AXES_PER_SAMPLE = check.AXES_PER_SAMPLE
AXES_ALL = check.AXES_ALL
AXES_BATCH_ONLY = check.AXES_BATCH_ONLY
EPS_OUTSIDE_SQRT = check.EPS_OUTSIDE_SQRT
EPS_MISSING = check.EPS_MISSING
EPS_HARD_CODED = check.EPS_HARD_CODED
GAMMA_MISSING = check.GAMMA_MISSING
BETA_MISSING = check.BETA_MISSING
BATCH_STATS_IN_EVAL = "eval mode normalizes with the batch's statistics"
AFFINE_MISSING = "gamma and beta not applied"
# 02 math
STATS_AS_CONSTANTS = check.STATS_AS_CONSTANTS
MISSING_MEAN_PATH = check.MISSING_MEAN_PATH
MISSING_VAR_PATH = check.MISSING_VAR_PATH
GAMMA_IS_VAR = "gamma set to the variance instead of the standard deviation"
GAMMA_IS_VAR_EPS = "gamma set to var + eps: the square root is missing"
GAMMA_IS_INVSTD = "gamma set to 1 / std: the normalization's factor, not its inverse"
BETA_ZERO = "beta left at 0 instead of the mean"
# 04 kernels
MERGE_NO_CORRECTION = "merge adds M2a + M2b without the delta^2 * na * nb / n term"
MERGE_UNWEIGHTED_MEAN = "merge averages the two means without weighting by the counts"
MERGE_CORRECTION_NOT_DIVIDED = "merge's correction delta^2 * na * nb is not divided by n"
WELFORD_NEW_MEAN_TWICE = "Welford's M2 update uses the new mean twice: (x - new_mean)^2"
WELFORD_OLD_MEAN_TWICE = "Welford's M2 update uses the old mean twice: (x - old_mean)^2"
TRAFFIC_ONE_READ = "traffic counts one read of x: that needs x kept in cache between passes"
TRAFFIC_BELOW_MINIMUM = "traffic below the minimum: less than any training forward moves"
TRAFFIC_UNFUSED = "traffic counts the unfused eager ops, not the minimum"
TRAFFIC_ELEMENTS_NOT_BYTES = "traffic counted in elements, not bytes"
TRAFFIC_IGNORES_ITEMSIZE = "traffic ignores itemsize: counted at 4 bytes per value"
TRAFFIC_VECTORS_TOO_LARGE = "traffic's (C,) part is too large"
#: the (C,) vectors a training forward may add on top of its passes (x's mean, invstd,
#: gamma, beta, running mean and var, read and written), each C * max(itemsize, 8) bytes
TRAFFIC_VECTORS = 12
# 05 LeNet
Z_INSTEAD_OF_T = "z = 1.96 instead of Student's t quantile"
POPULATION_STD = "population standard deviation (ddof=0) instead of the sample's (ddof=1)"
DIVIDES_BY_N = "standard error divides by n instead of sqrt(n)"
BN_MISSING = "a conv or hidden linear layer has no BatchNorm after it"
BN_WRONG_RANK = "BatchNorm1d after a conv (or BatchNorm2d after a linear)"
BN_WRONG_FEATURES = "BatchNorm's num_features is not the layer's output width"
BN_AFTER_LAST_LINEAR = "BatchNorm after the last linear layer (on the logits)"
# 06 pitfalls
PREDICT_TRAIN_MODE = "predict runs in train mode: the output depends on the batch"
PREDICT_LEFT_IN_EVAL = "predict leaves a training model in eval mode"
PREDICT_FORCED_TRAIN = "predict switches an eval model to train mode afterwards"
KERAS_MOMENTUM_COPIED = "Keras' momentum copied as is: PyTorch's is 1 - Keras'"
EPS_CHANGED = "epsilon changed: keep Keras' epsilon"
RECAL_NO_RESET = "recalibration does not reset the running statistics first"
RECAL_EXPONENTIAL = "recalibration keeps the exponential average (momentum 0.1)"
RECAL_MODE_NOT_RESTORED = "recalibration leaves the model in train mode"
RECAL_MOMENTUM_NOT_RESTORED = "recalibration leaves momentum=None in the BatchNorm layers"
# 07 fusion
FOLD_EPS_MISSING = EPS_MISSING  # the catalogue's mistake, by its fold-time name
FOLD_VAR_NOT_STD = "fold divides by running_var + eps instead of its square root"
FOLD_CONV_BIAS_DROPPED = "fold drops the conv's own bias"
FOLD_BIAS_NOT_SCALED = "fold adds the conv's bias without scaling it"
FOLD_BIAS_SCALED_TWICE = "fold scales the bias twice"
SHIFT_MEAN_NOT_SCALED = "shift = beta - running_mean: the mean is not scaled"
# 08 claims
ZEROED_EVERY_GAMMA = "zeroed every BatchNorm's gamma, not only each block's last"
ZEROED_BETA = "zeroed beta (the bias) instead of gamma (the weight)"
ZEROED_FIRST_BN = "zeroed the first BatchNorm of each block instead of the last"
ZEROED_DOWNSAMPLE_TOO = "zeroed the downsample (shortcut) BatchNorm too"
GN_OVER_BATCH = "group norm's statistics pool the batch axis too"
GN_INTERLEAVED_GROUPS = "channels grouped interleaved (c % groups), not contiguous"

HINTS = {
    **check._HINTS,
    BATCH_STATS_IN_EVAL: "in eval mode use running_mean and running_var, not x's statistics",
    AFFINE_MISSING: "scale by gamma and shift by beta after normalizing",
    GAMMA_IS_VAR: "BN divides by sqrt(var + eps); to undo it multiply by sqrt(var + eps)",
    GAMMA_IS_VAR_EPS: "BN divides by the standard deviation sqrt(var + eps), not by var + eps",
    GAMMA_IS_INVSTD: "gamma must undo the division by sqrt(var + eps): gamma = sqrt(var + eps)",
    BETA_ZERO: "BN subtracts the mean; beta = mean adds it back",
    MERGE_NO_CORRECTION: "the two parts' deviations are from their own means: add "
    "delta^2 * na * nb / n",
    MERGE_UNWEIGHTED_MEAN: "weigh the means by the counts: mean = ma + delta * nb / n",
    MERGE_CORRECTION_NOT_DIVIDED: "the correction is delta^2 * na * nb / n",
    WELFORD_NEW_MEAN_TWICE: "M2 += (x - old_mean) * (x - new_mean)",
    WELFORD_OLD_MEAN_TWICE: "M2 += (x - old_mean) * (x - new_mean)",
    TRAFFIC_ONE_READ: "the exercise counts no cache reuse: every pass over x comes from "
    "memory, and the statistics need all of a channel before its first y",
    TRAFFIC_BELOW_MINIMUM: "the statistics need every value of a channel before its first "
    "output, and every y must be written: count each pass over memory",
    TRAFFIC_UNFUSED: "count what one fused kernel must move, not each eager op's own passes",
    TRAFFIC_ELEMENTS_NOT_BYTES: "multiply the element count by itemsize",
    TRAFFIC_IGNORES_ITEMSIZE: "use the itemsize argument: a float16 value is 2 bytes, not 4",
    TRAFFIC_VECTORS_TOO_LARGE: "the (C,) parameters and statistics add at most "
    f"{TRAFFIC_VECTORS} vectors of C * max(itemsize, 8) bytes",
    Z_INSTEAD_OF_T: "for a few runs use Student's t quantile with n - 1 degrees of freedom",
    POPULATION_STD: "estimate the standard deviation with ddof=1 (unbiased=True)",
    DIVIDES_BY_N: "the standard error of the mean is std / sqrt(n)",
    BN_MISSING: "put a BatchNorm after every conv and hidden linear layer",
    BN_WRONG_RANK: "BatchNorm2d(channels) after a conv, BatchNorm1d(features) after a linear",
    BN_WRONG_FEATURES: "num_features = the conv's out_channels or the linear's out_features",
    BN_AFTER_LAST_LINEAR: "the last linear layer's outputs are the logits: no BatchNorm there",
    PREDICT_TRAIN_MODE: "call model.eval() before the forward",
    PREDICT_LEFT_IN_EVAL: "remember model.training and call model.train(was_training) after",
    PREDICT_FORCED_TRAIN: "restore the previous mode: model.train(was_training), not .train()",
    KERAS_MOMENTUM_COPIED: "Keras' 0.99 weighs the old value: PyTorch's momentum = 1 - 0.99",
    EPS_CHANGED: "epsilon means the same in both: keep Keras' value (its default is 1e-3)",
    RECAL_NO_RESET: "call reset_running_stats() on every BatchNorm before the passes",
    RECAL_EXPONENTIAL: "set momentum=None for a cumulative (equal-weight) average",
    RECAL_MODE_NOT_RESTORED: "remember model.training and restore it afterwards",
    RECAL_MOMENTUM_NOT_RESTORED: "put every BatchNorm's momentum back afterwards",
    FOLD_VAR_NOT_STD: "scale = gamma / sqrt(running_var + eps): the root of the variance",
    FOLD_CONV_BIAS_DROPPED: "bias = (conv_bias - running_mean) * scale + beta",
    FOLD_BIAS_NOT_SCALED: "BN scales what the conv outputs, its bias too: (b - mean) * scale",
    FOLD_BIAS_SCALED_TWICE: "scale the bias once: (b - running_mean) * scale + beta",
    SHIFT_MEAN_NOT_SCALED: "y = scale * (x - mean) + beta, so shift = beta - mean * scale",
    ZEROED_EVERY_GAMMA: "only the last BN of each residual block: bn2 (BasicBlock), "
    "bn3 (Bottleneck)",
    ZEROED_BETA: "zero the weight (gamma); beta is already 0 at initialization",
    ZEROED_FIRST_BN: "the block's output is its last BN's: bn2 (BasicBlock), bn3 (Bottleneck)",
    ZEROED_DOWNSAMPLE_TOO: "leave the shortcut alone: the block must start as the identity "
    "(or its shortcut projection)",
    GN_OVER_BATCH: "group norm is per sample: reduce over (channels of the group, H, W) only",
    GN_INTERLEAVED_GROUPS: "groups are contiguous: x.view(N, groups, C // groups, H, W)",
}

_F64 = torch.float64
_FALLBACK = "work through it step by step against the notebook's formula"

#: exercise function -> (notebook, the heading's text, without its number) of the section
#: that teaches it: the fallback's pointer when a result matches no typical mistake
SECTIONS = {
    "batch_stats": ("01_concepts", "What BN computes: per feature, per channel"),
    "bn_eval": ("01_concepts", "Training mode and evaluation mode in one picture"),
    "bn_backward_dx": ("02_math", "The compact formula"),
    "identity_params": ("02_math", "Why γ and β: BN can represent the identity"),
    "bn_forward": ("03_scratch", check.FORWARD_SECTION),
    "bn_backward": ("03_scratch", check.BACKWARD_SECTION),
    "running_stats_step": ("03_scratch", check.RUNNING_SECTION),
    "merge": ("04_numba_kernels", "Welford and Chan, and the catastrophic cancellation"),
    "welford_update": ("04_numba_kernels", "Welford and Chan, and the catastrophic cancellation"),
    "train_forward_bytes": ("04_numba_kernels", "Counting bytes: reads and writes"),
    "t_interval": ("05_lenet", "The t interval"),
    "predict": ("06_pitfalls", "Forgetting `model.eval()`"),
    "keras_to_torch": ("06_pitfalls", "Momentum and eps conventions across frameworks"),
    "recalibrate": ("06_pitfalls", "Stale or mismatched statistics: re-estimate them"),
    "scale_shift": ("07_fusion", "The algebra: one affine map absorbed into another"),
    "fold": ("07_fusion", "The algebra: one affine map absorbed into another"),
    "zero_init_last_gamma": ("08_claims", "Initialize the last γ of every residual block"),
    "group_norm": ("08_claims", "The normalization family"),
    "merge_replica_stats": ("09_distributed", "SyncBatchNorm is BN over the concatenated batch"),
    "ghost_bn": ("09_distributed", "Ghost batch normalization"),
}


def _reread(function: str) -> str:
    return reread(SECTIONS[function][1])


# ---------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------


def _hint(mistake: str | None) -> str:
    return f". Hint: {HINTS[mistake]}" if mistake else ""


def _fail(message: str, mistake: str | None = None) -> CheckResult:
    return CheckResult(False, mistake, message + _hint(mistake), float("inf"))


@contextmanager
def _seeded(seed: int):
    """Seed torch's global generator inside, and leave the learner's state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(_F64)
    return torch.as_tensor(value, dtype=_F64)


def _results(got, n: int, what: str, flat: bool = False) -> tuple[Tensor | None, CheckResult]:
    """A learner's n-tuple as one float64 tensor: stacked (same shapes) or ``flat``."""
    if not isinstance(got, (tuple, list)):
        return None, _fail(f"must return a tuple of {n} values {what}, got {type(got).__name__}")
    if len(got) != n:
        return None, _fail(f"must return a tuple of {n} values {what}, got {len(got)} values")
    try:
        parts = [_tensor(v) for v in got]
    except (TypeError, ValueError, RuntimeError) as err:
        return None, _fail(f"{what} holds something that is not a number or tensor: {err}")
    # a float32 answer stays float32, so that it is compared at float32's precision
    single = any(isinstance(v, Tensor) and v.dtype == torch.float32 for v in got)
    if flat:
        out = torch.cat([p.reshape(-1) for p in parts])
        return (out.float() if single else out), None
    if len({tuple(p.shape) for p in parts}) != 1:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        return None, _fail(f"the {n} values of {what} have different shapes: {shapes}")
    out = torch.stack(parts)
    return (out.float() if single else out), None


def _call_results(fn: Callable, args: tuple, n: int, what: str, flat: bool = False):
    """Call ``fn(*args)`` and read its n-tuple (:func:`_results`): (tensor, None), or
    (None, the failing CheckResult) when the call raised or returned the wrong thing."""
    got, error = _call(fn, *args)
    return (None, error) if error is not None else _results(got, n, what, flat)


def _first_failure(results: list[CheckResult], message: str) -> CheckResult:
    for result in results:
        if not result.passed:
            return result
    return CheckResult(True, None, message, max(r.max_abs_diff for r in results))


def _per_channel_vector(t: Tensor, c: int) -> Tensor:
    """(1, C, 1, 1) or (C,) -> (C,): keepdim results are fine too."""
    return t.reshape(c) if t.numel() == c else t


# ---------------------------------------------------------------------------------
# 01 concepts: batch statistics, eval-mode BN
# ---------------------------------------------------------------------------------


def _per_channel_pair(fn: Callable, args: tuple, what: str, channels: int):
    """Call ``fn(*args)``, expect two per-channel vectors back; (stacked (2, C), None) or
    (None, the failing CheckResult)."""
    got, error = _call_results(fn, args, 2, what)
    if error is not None:
        return None, error
    return torch.stack([_per_channel_vector(g, channels) for g in got]), None


def _stats_variants(x: Tensor, value: Callable[[Tensor, Tensor], Tensor]) -> dict[str, Tensor]:
    """``value(mean, var)`` from statistics with each mistake of the catalogue that fits
    them: the unbiased variance and each wrong set of axes."""
    dims = F.reduce_dims(x)
    variants = {UNBIASED_VARIANCE: value(x.mean(dim=dims), x.var(dim=dims, unbiased=True))}
    for mistake, axes in check.wrong_axes(x).items():
        variants[mistake] = value(x.mean(dim=axes), x.var(dim=axes, unbiased=False))
    return variants


def _stats(x: Tensor, dims, unbiased: bool = False) -> Tensor:
    return torch.stack([x.mean(dim=dims), x.var(dim=dims, unbiased=unbiased)])


def _batch_stats_case(fn: Callable, ndim: int, tol: float) -> CheckResult:
    x, *_ = _forward_input(ndim)
    got, error = _per_channel_pair(fn, (x.clone(),), "(mean, var)", x.shape[1])
    if error is not None:
        return error
    variants = _stats_variants(x, lambda mean, var: torch.stack([mean, var]))
    what = f"(mean, var) of a {tuple(x.shape)} input"
    return _diagnose(
        got,
        _stats(x, F.reduce_dims(x)),
        variants,
        what,
        tol,
        HINTS,
        _reread("batch_stats"),
        labels=("mean", "var"),
    )


def check_batch_stats(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(x) -> (mean, var)``: per-channel mean and biased variance, two (C,) tensors.

    Runs an (N, C, H, W) input, then an (N, C) one (float64).
    """
    results = []
    for ndim in (4, 2):
        results.append(_batch_stats_case(fn, ndim, tol))
        if not results[-1].passed:
            return results[-1]
    return _first_failure(results, "mean and var match the reference for 4-D and 2-D input")


def _eval_input() -> tuple[Tensor, ...]:
    x, gamma, beta, eps = _forward_input(4)
    running_mean = torch.tensor([0.2, -1.0, 3.9], dtype=_F64)
    running_var = torch.tensor([0.5, 4.0, 2e-4], dtype=_F64)  # 2e-4 ~ eps: eps placement shows
    return x, running_mean, running_var, gamma, beta, eps


def _eval_bn(x, mean, var, gamma, beta, eps, mistake: str | None = None) -> Tensor:
    """Eval-mode BN with the running statistics, or with one mistake built in."""
    std = {
        EPS_OUTSIDE_SQRT: lambda: var.sqrt() + eps,
        EPS_MISSING: var.sqrt,
        EPS_HARD_CODED: lambda: (var + check.DEFAULT_EPS).sqrt(),
    }.get(mistake, lambda: (var + eps).sqrt())()
    out = (x - F.per_channel(mean, x)) / F.per_channel(std, x)
    if mistake in (AFFINE_MISSING, GAMMA_MISSING):
        return out if mistake == AFFINE_MISSING else out + F.per_channel(beta, x)
    return F.per_channel(gamma, x) * out + (
        0.0 if mistake == BETA_MISSING else F.per_channel(beta, x)
    )


def check_bn_eval(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(x, running_mean, running_var, gamma, beta, eps) -> out``: eval-mode BN.

    x is (N, C, H, W) float64; the running statistics differ from the batch's.
    """
    args = _eval_input()
    got, error = _call(fn, *(a.clone() if isinstance(a, Tensor) else a for a in args))
    if error is not None:
        return error
    if not isinstance(got, Tensor):
        return _fail(f"returned {type(got).__name__}, expected a tensor")
    x, mean, var, gamma, beta, eps = args
    batch_mean, batch_var = F.batch_stats(x)
    variants = {BATCH_STATS_IN_EVAL: _eval_bn(x, batch_mean, batch_var, gamma, beta, eps)}
    for mistake in (
        EPS_OUTSIDE_SQRT,
        EPS_MISSING,
        EPS_HARD_CODED,
        AFFINE_MISSING,
        GAMMA_MISSING,
        BETA_MISSING,
    ):
        variants[mistake] = _eval_bn(*args, mistake=mistake)
    fallback = _reread("bn_eval")
    return _diagnose(got, _eval_bn(*args), variants, "eval-mode output", tol, HINTS, fallback)


# ---------------------------------------------------------------------------------
# 02 math: the input gradient, and the parameters that make BN the identity
# ---------------------------------------------------------------------------------


def check_bn_backward_dx(fn: Callable, ndim: int = 2, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(dout, x, gamma, eps) -> dx``, training-mode BN's input gradient.

    ``ndim`` 2 tests (N, D) input (the derivation's layout), 4 tests (N, C, H, W).
    """
    if ndim not in (2, 4):
        raise ValueError(f"ndim must be 2 or 4 (got {ndim!r})")
    x, gamma, beta, eps = _forward_input(ndim)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=_F64)
    got, error = _call(fn, dout.clone(), x.clone(), gamma.clone(), eps)
    if error is not None:
        return error
    if not isinstance(got, Tensor):
        return _fail(f"returned {type(got).__name__}, expected the tensor dx")
    cache = F.batchnorm_forward(x, gamma, beta, eps)[1]
    reference = F.batchnorm_backward_compact(dout, cache)[0]
    variants = check.dx_variants(dout, x, gamma, eps)
    return _diagnose(got, reference, variants, "dx", tol, HINTS, _reread("bn_backward_dx"))


def check_identity_params(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(x, eps) -> (gamma, beta)``: training-mode BN of x with them returns x.

    x is (N, C, H, W) float64 with one channel of std 0.01, so forgetting eps shows.
    """
    x, _gamma, _beta, eps = _forward_input(4)
    got, error = _per_channel_pair(fn, (x.clone(), eps), "(gamma, beta)", x.shape[1])
    if error is not None:
        return error
    mean, var = F.batch_stats(x)

    def params(mean, var):
        return torch.stack([(var + eps).sqrt(), mean])

    variants = {
        **_stats_variants(x, params),
        GAMMA_IS_VAR: torch.stack([var, mean]),
        GAMMA_IS_VAR_EPS: torch.stack([var + eps, mean]),
        GAMMA_IS_INVSTD: torch.stack([(var + eps).rsqrt(), mean]),
        EPS_MISSING: torch.stack([var.sqrt(), mean]),
        EPS_OUTSIDE_SQRT: torch.stack([var.sqrt() + eps, mean]),
        EPS_HARD_CODED: torch.stack([(var + check.DEFAULT_EPS).sqrt(), mean]),
        BETA_ZERO: torch.stack([(var + eps).sqrt(), torch.zeros_like(mean)]),
    }
    return _diagnose(
        got,
        params(mean, var),
        variants,
        "(gamma, beta)",
        tol,
        HINTS,
        _reread("identity_params"),
        labels=("gamma", "beta"),
    )


# ---------------------------------------------------------------------------------
# 04 kernels: Chan's merge, Welford's update, memory traffic
# ---------------------------------------------------------------------------------


def _summary(values: list[float]) -> tuple[int, float, float]:
    mean = sum(values) / len(values)
    return len(values), mean, sum((v - mean) ** 2 for v in values)


def _merged(a, b, variant: str | None = None) -> Tensor:
    (na, ma, qa), (nb, mb, qb) = a, b
    n, delta = na + nb, mb - ma
    mean = (ma + mb) / 2 if variant == MERGE_UNWEIGHTED_MEAN else ma + delta * nb / n
    correction = {MERGE_NO_CORRECTION: 0.0, MERGE_CORRECTION_NOT_DIVIDED: delta**2 * na * nb}
    m2 = qa + qb + correction.get(variant, delta**2 * na * nb / n)
    return torch.tensor([n, mean, m2], dtype=_F64)


def check_merge(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(a, b) -> (count, mean, M2)``, Chan's merge of two (count, mean, M2).

    The parts have 3 and 7 values with different means (Python floats in, numbers or
    0-d tensors out); ``tol`` is relative, so float32 results pass.
    """
    a = _summary([1.0, 2.5, 4.0])
    b = _summary([6.0, 7.5, 5.0, 9.0, 8.0, 6.5, 7.0])
    got, error = _call_results(fn, (a, b), 3, "(count, mean, M2)", flat=True)
    if error is not None:
        return error
    reference = _merged(a, b)
    variants = {
        v: _merged(a, b, v)
        for v in (MERGE_NO_CORRECTION, MERGE_UNWEIGHTED_MEAN, MERGE_CORRECTION_NOT_DIVIDED)
    }
    return _diagnose(
        got,
        reference,
        variants,
        "the merged (count, mean, M2)",
        tol,
        HINTS,
        _reread("merge"),
        scale=reference.abs(),  # tol is relative
        describe=lambda i: ("count", "mean", "M2")[i[0]],
    )


def _welford_step(state, x: float, variant: str | None = None) -> tuple[int, float, float]:
    n, mean, m2 = state
    n += 1
    new_mean = mean + (x - mean) / n
    if variant == WELFORD_NEW_MEAN_TWICE:
        return n, new_mean, m2 + (x - new_mean) ** 2
    if variant == WELFORD_OLD_MEAN_TWICE:
        return n, new_mean, m2 + (x - mean) ** 2
    return n, new_mean, m2 + (x - mean) * (x - new_mean)


_WELFORD_VALUES = (2.0, 4.0, 4.5, 7.0, 1.0)


def _welford_run(variant: str | None = None) -> Tensor:
    """Each state after a step from (0, 0, 0) over _WELFORD_VALUES, then one from (4, 1, 2.5)."""
    states, state = [], (0, 0.0, 0.0)
    for x in _WELFORD_VALUES:
        state = _welford_step(state, x, variant)
        states.append(state)
    states.append(_welford_step((4, 1.0, 2.5), 6.0, variant))
    return torch.tensor(states, dtype=_F64)


def _welford_call(fn: Callable, state, x: float):
    return _call_results(fn, (state, x), 3, "the new (count, mean, M2)", flat=True)


def check_welford_update(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(state, x) -> new state``, one Welford step on (count, mean, M2).

    Runs five values from (0, 0.0, 0.0), then one step from (4, 1.0, 2.5) with x = 6.0.
    """
    rows, state = [], (0, 0.0, 0.0)
    for x in _WELFORD_VALUES:
        got, error = _welford_call(fn, state, x)
        if error is not None:
            return error
        rows.append(got)
        state = (int(got[0]), got[1].item(), got[2].item())
    got, error = _welford_call(fn, (4, 1.0, 2.5), 6.0)
    if error is not None:
        return error
    rows.append(got)
    reference = _welford_run()
    variants = {v: _welford_run(v) for v in (WELFORD_NEW_MEAN_TWICE, WELFORD_OLD_MEAN_TWICE)}

    def describe(index: tuple[int, ...]) -> str:
        step = index[0] + 1
        start = "from (0, 0.0, 0.0)" if step <= len(_WELFORD_VALUES) else "from (4, 1.0, 2.5)"
        return f"{('count', 'mean', 'M2')[index[1]]} after step {step} ({start})"

    return _diagnose(
        torch.stack(rows),
        reference,
        variants,
        "the (count, mean, M2) after each step",
        tol,
        HINTS,
        _reread("welford_update"),
        scale=reference.abs().clamp(min=1.0),  # tol is relative
        describe=describe,
    )


def _vectors_bytes(channels: int, itemsize: int) -> int:
    """The most the (C,) vectors may add: the CPU kernel keeps its statistics in float64."""
    return TRAFFIC_VECTORS * channels * max(itemsize, 8)


def _traffic_diagnosis(got: float, numel: int, channels: int, itemsize: int) -> str | None:
    if got == 3 * numel and itemsize != 1:
        return TRAFFIC_ELEMENTS_NOT_BYTES
    if itemsize != 4 and 0 <= got - 3 * numel * 4 <= _vectors_bytes(channels, 4):
        return TRAFFIC_IGNORES_ITEMSIZE
    if 0 < got - 3 * numel * itemsize < numel * itemsize:  # passes right, (C,) part not
        return TRAFFIC_VECTORS_TOO_LARGE
    passes = got / (numel * itemsize)
    if passes == 2:
        return TRAFFIC_ONE_READ
    if passes < 3:
        return TRAFFIC_BELOW_MINIMUM
    if passes in (5, 6, 7, 8, 9):
        return TRAFFIC_UNFUSED
    return None


def check_train_forward_bytes(fn: Callable) -> CheckResult:
    """Check ``fn(shape, itemsize) -> bytes``: a training forward's minimum memory traffic
    with no cache reuse (every pass over x streams from memory, as when not even one
    channel's values fit in the cache).

    The minimum: read x for the statistics, read it again to normalize, write y; the (C,)
    parameters and statistics are accepted on top (up to :data:`TRAFFIC_VECTORS` vectors of
    C * max(itemsize, 8) bytes), never less. A count below the minimum is refused with the
    reason; no result prints the expected count or its distance to the count given.
    """
    result = _train_forward_bytes_result(fn)
    # a failure's distance to the reference would give the answer away: got - diff
    diff = result.max_abs_diff if result.passed else float("inf")
    return CheckResult(result.passed, result.mistake, result.message, diff, show_diff=False)


def _train_forward_bytes_result(fn: Callable) -> CheckResult:
    results = []
    for shape, itemsize in (((64, 32, 28, 28), 4), ((128, 256), 2)):
        got, error = _call(fn, shape, itemsize)
        if error is not None:
            return error
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return _fail(f"returned {type(got).__name__}, expected a number of bytes")
        numel, channels = math.prod(shape), shape[1]
        minimum = 3 * numel * itemsize
        extra = got - minimum
        if 0 <= extra <= _vectors_bytes(channels, itemsize):  # the (C,) vectors on top
            results.append(CheckResult(True, None, "", float(extra)))
            continue
        mistake = _traffic_diagnosis(got, numel, channels, itemsize)
        what = f"bytes for {shape} x {itemsize} B: {got}"
        if extra < 0:  # the pass count would round to the answer: the reason instead
            what += ", below the minimum of a training forward with no cache reuse"
        elif mistake in (TRAFFIC_VECTORS_TOO_LARGE, TRAFFIC_IGNORES_ITEMSIZE):
            pass  # the pass count would round to the answer; the hint says what is wrong
        else:
            what += f", {got / (numel * itemsize):.3g} passes over x"
        reason = _hint(mistake) if mistake else f"; {_reread('train_forward_bytes')}"
        return CheckResult(False, mistake, what + reason, float(abs(extra)))
    return _first_failure(results, "the byte counts match the minimum traffic with no cache reuse")


# ---------------------------------------------------------------------------------
# 05 LeNet: a t interval, BN in LeNet
# ---------------------------------------------------------------------------------


def _interval(values: Tensor, confidence: float, variant: str | None = None) -> Tensor:
    n = values.numel()
    std = values.std(unbiased=variant != POPULATION_STD)
    p = 0.5 + confidence / 2
    normal = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=_F64)).item()
    q = normal if variant == Z_INSTEAD_OF_T else float(stats.t.ppf(p, n - 1))
    se = std / (n if variant == DIVIDES_BY_N else math.sqrt(n))
    return torch.stack([values.mean(), q * se])


_INTERVAL_CASES = (
    (torch.tensor([88.1, 89.4, 87.6, 88.9, 90.2], dtype=_F64), None),
    (torch.tensor([0.91, 0.89, 0.93, 0.90, 0.88, 0.92, 0.94, 0.90, 0.91, 0.89]).double(), 0.9),
)


def _interval_case(fn: Callable, values: Tensor, confidence: float | None, tol: float):
    args = (values.clone(),) if confidence is None else (values.clone(), confidence)
    got, error = _call_results(fn, args, 2, "(mean, half_width)", flat=True)
    if error is not None:
        return error
    confidence = 0.95 if confidence is None else confidence
    reference = _interval(values, confidence)
    variants = {
        v: _interval(values, confidence, v) for v in (Z_INSTEAD_OF_T, POPULATION_STD, DIVIDES_BY_N)
    }
    what = f"(mean, half_width) of {values.numel()} values at confidence {confidence}"
    return _diagnose(
        got,
        reference,
        variants,
        what,
        tol,
        HINTS,
        _reread("t_interval"),
        scale=reference[1],  # tol is relative to the half-width
        describe=lambda i: ("the mean", "the half-width")[i[0]],
    )


def check_t_interval(fn: Callable, tol: float = 1e-4) -> CheckResult:
    """Check ``fn(values, confidence=0.95) -> (mean, half_width)``, a t interval of the mean.

    Runs 5 accuracies at the default confidence, then 10 at ``confidence=0.9``; ``tol`` is
    relative to the half-width (a 4-digit t table passes).
    """
    results = []
    for values, confidence in _INTERVAL_CASES:
        results.append(_interval_case(fn, values, confidence, tol))
        if not results[-1].passed:
            return results[-1]
    return _first_failure(results, "mean and half-width match Student's t interval")


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation"


def _bn_rank(module: nn.Module) -> int:
    return 2 if type(module).__name__.endswith("2d") else 1


def _block_mistake(leaf: list[nn.Module], i: int, last: bool) -> str | None:
    """The mistake after weighted layer ``leaf[i]``, or None if BN follows it correctly."""
    layer = leaf[i]
    after = leaf[i + 1 : i + 3]
    if last:
        return BN_AFTER_LAST_LINEAR if after and is_batchnorm(after[0]) else None
    # Both placements pass: layer -> BN -> activation (Ioffe & Szegedy) and
    # layer -> activation -> BN; notebook 05 does not resolve a difference between them.
    if after and _is_activation(after[0]) and len(after) == 2 and is_batchnorm(after[1]):
        after = after[1:]
    if not after or not is_batchnorm(after[0]):
        return BN_MISSING
    bn = after[0]
    if _bn_rank(bn) != (2 if isinstance(layer, nn.Conv2d) else 1):
        return BN_WRONG_RANK
    width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return BN_WRONG_FEATURES if bn.num_features != width else None


def check_lenet_bn(build: Callable | nn.Module) -> CheckResult:
    """Check LeNet with BN: ``build() -> model`` (or the model), for (N, 1, 28, 28) input.

    A BatchNorm of the right rank and width must follow every conv and hidden linear
    layer, before its activation or right after it (both placements pass: notebook 05
    does not resolve a difference between them); none after the last linear layer; 10 logits out.
    """
    model = build
    if not isinstance(build, nn.Module):
        with torch.random.fork_rng(devices=[]):  # the notebook's random stream stays as it was
            model, error = _call(build)
        if error is not None:
            return error
    if not isinstance(model, nn.Module):
        return _fail(f"returned {type(model).__name__}, expected an nn.Module")
    leaf = [m for _name, m in leaves(model)]
    weighted = [i for i, m in enumerate(leaf) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted or not isinstance(leaf[weighted[-1]], nn.Linear):
        return _fail("expected conv layers and linear layers, a linear one last")
    for i in weighted:
        mistake = _block_mistake(leaf, i, last=i == weighted[-1])
        if mistake is not None:
            return _fail(f"layer {i} ({type(leaf[i]).__name__}) is wrong", mistake)
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        out, error = _call(model, torch.randn(4, 1, 28, 28, generator=torch.Generator()))
    if error is not None:
        return error
    if tuple(out.shape) != (4, 10):
        return _fail(f"output shape {tuple(out.shape)} for 4 images, expected (4, 10)")
    return CheckResult(True, None, f"BN follows all {len(weighted) - 1} hidden layers", 0.0)


# ---------------------------------------------------------------------------------
# 06 pitfalls: predict in eval mode, Keras' conventions, recalibration
# ---------------------------------------------------------------------------------


def _small_model(seed: int = 0) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear -> BN, float64, with running stats far from a batch's."""
    with _seeded(seed):
        model = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5)
        ).double()
    with torch.no_grad():
        for _name, bn in batchnorm_layers(model):
            bn.running_mean.fill_(2.0)
            bn.running_var.fill_(5.0)
            bn.num_batches_tracked.fill_(50)
    return model


def _batch(seed: int, n: int = 8) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=_F64) * 1.5 + 0.7


def _forward(model: nn.Module, x: Tensor, train: bool) -> Tensor:
    model = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return model(x)


def _predict_mode_after(fn: Callable, training: bool) -> CheckResult | None:
    model = _small_model().train(training)
    _, error = _call(fn, model, _batch(1))
    if error is not None:
        return error
    if model.training == training:
        return None
    mistake = PREDICT_LEFT_IN_EVAL if training else PREDICT_FORCED_TRAIN
    return _fail(f"the model was in {'train' if training else 'eval'} mode before", mistake)


def check_predict(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(model, x) -> logits``: eval-mode output, the model's mode restored after.

    The model (float64, BN with running statistics far from the batch's) is in train mode.
    """
    model, x = _small_model().train(), _batch(1)
    got, error = _call(fn, model, x.clone())
    if error is not None:
        return error
    if not isinstance(got, Tensor):
        return _fail(f"returned {type(got).__name__}, expected a tensor of logits")
    reference = _forward(_small_model(), x, train=False)
    variants = {PREDICT_TRAIN_MODE: _forward(_small_model(), x, train=True)}
    result = _diagnose(got, reference, variants, "logits", tol, HINTS, _reread("predict"))
    if not result.passed:
        return result
    for training in (True, False):
        problem = _predict_mode_after(fn, training)
        if problem is not None:
            return problem
    return CheckResult(True, None, "eval-mode logits, and the model's mode is restored", 0.0)


def check_keras_to_torch(fn: Callable, tol: float = 1e-12) -> CheckResult:
    """Check ``fn(momentum, epsilon) -> (torch_momentum, torch_eps)`` for Keras' BN arguments.

    Runs Keras' defaults (0.99, 1e-3), then (0.9, 1e-2).
    """
    cases = ((0.99, 1e-3), (0.9, 1e-2))
    rows = []
    for momentum, epsilon in cases:
        got, error = _call_results(
            fn, (momentum, epsilon), 2, "(torch_momentum, torch_eps)", flat=True
        )
        if error is not None:
            return error
        rows.append(got)
    reference = torch.tensor([[1 - m, e] for m, e in cases], dtype=_F64)
    variants = {
        KERAS_MOMENTUM_COPIED: torch.tensor([[m, e] for m, e in cases], dtype=_F64),
        EPS_CHANGED: torch.tensor([[1 - m, 1e-5] for m, e in cases], dtype=_F64),
    }
    what = "(torch_momentum, torch_eps)"
    return _diagnose(
        torch.stack(rows),
        reference,
        variants,
        what,
        tol,
        HINTS,
        _reread("keras_to_torch"),
        describe=lambda i: f"{('torch_momentum', 'torch_eps')[i[1]]} for Keras' {cases[i[0]]}",
    )


def _running_stats(model: nn.Module) -> Tensor:
    return torch.cat(
        [torch.cat([bn.running_mean, bn.running_var]) for _n, bn in batchnorm_layers(model)]
    ).to(_F64)


def _recalibrated(batches: list[Tensor], reset: bool = True, momentum=None) -> Tensor:
    model = _small_model().train()
    for _name, bn in batchnorm_layers(model):
        if reset:
            bn.reset_running_stats()
        bn.momentum = momentum
    with torch.no_grad():
        for x in batches:
            model(x)
    return _running_stats(model)


def _pooled(batches: list[Tensor]) -> Tensor:
    """Precise BN (bnlab.recalibrate): pooled statistics, also a right answer."""
    from bnlab.inference.recalibrate import recalibrate_bn

    model = _small_model()
    recalibrate_bn(model, batches)
    return _running_stats(model)


def _recal_state_mistake(model: nn.Module) -> str | None:
    if model.training:
        return RECAL_MODE_NOT_RESTORED
    if any(bn.momentum != 0.1 for _n, bn in batchnorm_layers(model)):
        return RECAL_MOMENTUM_NOT_RESTORED
    return None


def check_recalibrate(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(model, batches)``: re-estimates every BN's running statistics in place.

    The model (float64, eval mode, momentum 0.1, stale statistics and 50 batches tracked)
    sees 3 batches of 8; the equal-weight average of the batches' statistics (momentum=None)
    and the pooled statistics of precise BN are both right. Mode and momentum must be
    restored.
    """
    model, batches = _small_model().eval(), [_batch(s) for s in (2, 3, 4)]
    _, error = _call(fn, model, [b.clone() for b in batches])
    if error is not None:
        return error
    got = _running_stats(model)
    reference = _recalibrated(batches)
    pooled = _pooled(batches)
    if got.shape == pooled.shape and check._max_diff(got, pooled) <= tol:
        reference = pooled
    variants = {
        RECAL_NO_RESET: _recalibrated(batches, reset=False),
        RECAL_EXPONENTIAL: _recalibrated(batches, momentum=0.1),
    }
    result = _diagnose(
        got, reference, variants, "running statistics", tol, HINTS, _reread("recalibrate")
    )
    if not result.passed:
        return result
    mistake = _recal_state_mistake(model)
    if mistake is not None:
        return _fail("the statistics are right, but the model is not as it was", mistake)
    return result


# ---------------------------------------------------------------------------------
# 07 fusion: folding BN into the conv before it
# ---------------------------------------------------------------------------------


def _conv_bn(bias: bool) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    with _seeded(7):
        conv = nn.Conv2d(3, 4, 3, bias=bias).double()
    bn = nn.BatchNorm2d(4, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0.5]))
        bn.running_mean.copy_(torch.tensor([0.4, -1.0, 2.0, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 4.0, 2e-4, 1.7]))  # 2e-4 ~ eps shows eps
        if bias:
            conv.bias.copy_(torch.tensor([0.8, -0.6, 1.2, 0.9]))
    return conv, bn


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, variant: str | None = None) -> Tensor:
    scale = _bn_scale(bn, variant)
    b = torch.zeros_like(scale) if conv.bias is None else conv.bias.detach()
    b = torch.zeros_like(b) if variant == FOLD_CONV_BIAS_DROPPED else b
    mean, beta = bn.running_mean.detach(), bn.bias.detach()
    bias = {
        FOLD_BIAS_NOT_SCALED: b - mean * scale + beta,
        FOLD_BIAS_SCALED_TWICE: (b - mean) * scale * scale + beta,
    }.get(variant, (b - mean) * scale + beta)
    weight = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    return torch.cat([weight.reshape(-1), bias])


def _bn_std(bn: nn.BatchNorm2d, variant: str | None) -> Tensor:
    """sqrt(running_var + eps), or with one of the catalogue's eps mistakes."""
    var, eps = bn.running_var.detach(), bn.eps
    return {
        FOLD_EPS_MISSING: var.sqrt,
        FOLD_VAR_NOT_STD: lambda: var + eps,
        EPS_OUTSIDE_SQRT: lambda: var.sqrt() + eps,
        EPS_HARD_CODED: lambda: (var + check.DEFAULT_EPS).sqrt(),
    }.get(variant, lambda: (var + eps).sqrt())()


def _bn_scale(bn: nn.BatchNorm2d, variant: str | None) -> Tensor:
    gamma = torch.ones_like(bn.weight) if variant == GAMMA_MISSING else bn.weight.detach()
    return gamma / _bn_std(bn, variant)


#: the catalogue's mistakes in eval-mode BN's scale gamma / sqrt(running_var + eps)
_SCALE_MISTAKES = (
    FOLD_EPS_MISSING,
    FOLD_VAR_NOT_STD,
    EPS_OUTSIDE_SQRT,
    EPS_HARD_CODED,
    GAMMA_MISSING,
)


def _scale_shift(bn: nn.BatchNorm2d, variant: str | None = None) -> Tensor:
    scale = _bn_scale(bn, variant)
    mean = bn.running_mean.detach() * (1.0 if variant == SHIFT_MEAN_NOT_SCALED else scale)
    return torch.stack([scale, bn.bias.detach() - mean])


def check_scale_shift(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(bn) -> (scale, shift)``: eval-mode BN as ``y = scale * x + shift``.

    bn is an eval-mode float64 BatchNorm2d(4) with eps 1e-3 and one running_var of 2e-4.
    """
    _conv, bn = _conv_bn(bias=False)
    got, error = _call_results(fn, (copy.deepcopy(bn),), 2, "(scale, shift)")
    if error is not None:
        return error
    variants = {v: _scale_shift(bn, v) for v in (*_SCALE_MISTAKES, SHIFT_MEAN_NOT_SCALED)}
    return _diagnose(
        got,
        _scale_shift(bn),
        variants,
        "(scale, shift)",
        tol,
        HINTS,
        _reread("scale_shift"),
        labels=("scale", "shift"),
    )


_FOLD_MISTAKES = (
    *_SCALE_MISTAKES,
    FOLD_CONV_BIAS_DROPPED,
    FOLD_BIAS_NOT_SCALED,
    FOLD_BIAS_SCALED_TWICE,
)


def _weight_and_bias(got, layer: nn.Module, kind: str, layout: str):
    """A fold's answer, (weight, bias) shaped as ``layer``'s, as one flat tensor, or the error.

    The folded layer always needs a bias, even when ``layer`` (a ``kind``) has none.
    """
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and got[1] is not None):
        return None, _fail(f"must return (weight, bias), a bias even when the {kind} has none")
    shapes = [tuple(torch.as_tensor(g).shape) for g in got]
    expected = [tuple(layer.weight.shape), (layer.weight.shape[0],)]
    if shapes != expected:
        return None, _fail(
            f"(weight, bias) have shapes {shapes[0]} and {shapes[1]}, expected "
            f"{expected[0]} {layout} and {expected[1]}"
        )
    return _results(got, 2, "(weight, bias)", flat=True)


def _fold_case(fn: Callable, bias: bool, tol: float) -> CheckResult:
    conv, bn = _conv_bn(bias)
    got, error = _call(fn, copy.deepcopy(conv), copy.deepcopy(bn))
    if error is not None:
        return error
    got, error = _weight_and_bias(got, conv, "conv", "(out_channels, in_channels, kH, kW)")
    if error is not None:
        return error
    variants = {v: _folded(conv, bn, v) for v in _FOLD_MISTAKES}
    what = f"folded (weight, bias) of a conv {'with' if bias else 'without'} bias"
    n = conv.weight.numel()
    per_filter = n // conv.out_channels

    def describe(index: tuple[int, ...]) -> str:
        i = index[0]
        return (
            f"the weight of output channel {i // per_filter}"
            if i < n
            else f"the bias of channel {i - n}"
        )

    return _diagnose(
        got, _folded(conv, bn), variants, what, tol, HINTS, _reread("fold"), describe=describe
    )


def check_fold(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(conv, bn) -> (weight, bias)``: the conv equal to conv then eval-mode bn.

    Runs a float64 Conv2d(3, 4, 3) with a bias, then one without (bias=None: the folded
    conv still needs one); BN's eps is 1e-3 and one channel's running_var 2e-4.
    """
    results = [_fold_case(fn, bias, tol) for bias in (True, False)]
    return _first_failure(results, "folded weight and bias match, with and without conv bias")


# 07 fusion: folding BN into the Linear after it (BN -> Linear, no padding: always exact)

NEXT_SCALE_ON_OUTPUTS = "fold scales the Linear's rows (outputs) instead of its columns (inputs)"
NEXT_SHIFT_NOT_THROUGH_WEIGHT = "fold adds BN's shift to the bias as is, not through the weight"
NEXT_SHIFT_THROUGH_FOLDED_WEIGHT = "fold passes the shift through the scaled weight W * scale"
NEXT_SHIFT_TRANSPOSED = "fold multiplies the shift by the transposed weight W.T"
NEXT_BIAS_DROPPED = "fold drops the Linear's own bias"

HINTS.update(
    {
        NEXT_SCALE_ON_OUTPUTS: "BN scales the Linear's inputs: multiply column j of W "
        "(W[:, j], input feature j) by scale[j]",
        NEXT_SHIFT_NOT_THROUGH_WEIGHT: "the shift is part of the Linear's input, so the "
        "weight multiplies it: b' = b + W @ shift",
        NEXT_SHIFT_THROUGH_FOLDED_WEIGHT: "W (scale * x + shift) = (W * scale) x + W @ shift: "
        "the shift meets the original W",
        NEXT_SHIFT_TRANSPOSED: "W is (out_features, in_features): W @ shift has one entry "
        "per output",
        NEXT_BIAS_DROPPED: "keep the Linear's bias: b' = b + W @ shift",
    }
)

_NEXT_FALLBACK = (
    "expand linear(scale * x + shift) term by term, with scale and shift of section 1, and "
    "reread section 7's cell on BN before a Linear"
)


def _bn_linear(square: bool) -> tuple[nn.BatchNorm1d, nn.Linear]:
    """An eval-mode float64 BatchNorm1d(4), eps 1e-3, and the Linear after it: (4 -> 4) with
    a bias, or (4 -> 3) without one."""
    bn = nn.BatchNorm1d(4, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.2, 0.5]))
        bn.running_mean.copy_(torch.tensor([0.4, -1.0, 2.0, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 4.0, 2e-4, 1.7]))  # 2e-4 ~ eps shows eps
    with _seeded(71):
        linear = nn.Linear(4, 4 if square else 3, bias=square).double()
    return bn, linear


def _folded_next(bn: nn.BatchNorm1d, linear: nn.Linear, variant: str | None = None) -> Tensor:
    var, eps = bn.running_var.detach(), bn.eps
    std = {FOLD_EPS_MISSING: var.sqrt(), FOLD_VAR_NOT_STD: var + eps}.get(variant)
    scale = bn.weight.detach() / ((var + eps).sqrt() if std is None else std)
    shift = bn.bias.detach() - bn.running_mean.detach() * scale
    w = linear.weight.detach()
    keep = linear.bias is not None and variant != NEXT_BIAS_DROPPED
    b = linear.bias.detach() if keep else torch.zeros(w.shape[0], dtype=w.dtype)
    weight = w * (scale[:, None] if variant == NEXT_SCALE_ON_OUTPUTS else scale)
    through = {
        NEXT_SHIFT_NOT_THROUGH_WEIGHT: lambda: shift,
        NEXT_SHIFT_THROUGH_FOLDED_WEIGHT: lambda: (w * scale) @ shift,
        NEXT_SHIFT_TRANSPOSED: lambda: w.T @ shift,
    }.get(variant, lambda: w @ shift)
    return torch.cat([weight.reshape(-1), b + through()])


def _fold_next_case(fn: Callable, square: bool, tol: float) -> CheckResult:
    bn, linear = _bn_linear(square)
    got, error = _call(fn, copy.deepcopy(bn), copy.deepcopy(linear))
    if error is not None:
        return error
    flat, error = _weight_and_bias(got, linear, "Linear", "(out_features, in_features)")
    if error is not None:
        return error
    # the square Linear with a bias tells every mistake apart; the (4 -> 3) one without a
    # bias checks the shapes and the bias a Linear gains
    mistakes = (FOLD_EPS_MISSING, FOLD_VAR_NOT_STD, NEXT_SHIFT_THROUGH_FOLDED_WEIGHT)
    if square:
        mistakes += (
            NEXT_SCALE_ON_OUTPUTS,
            NEXT_SHIFT_NOT_THROUGH_WEIGHT,
            NEXT_SHIFT_TRANSPOSED,
            NEXT_BIAS_DROPPED,
        )
    variants = {v: _folded_next(bn, linear, v) for v in mistakes}
    reference = _folded_next(bn, linear)
    what = f"folded (weight, bias) of a Linear({linear.in_features}, {linear.out_features}"
    what += ")" if square else ", bias=False)"
    result = _diagnose(flat, reference, variants, what, tol, HINTS, _NEXT_FALLBACK)
    if result.passed or result.mistake is not None:
        return result
    n = linear.weight.numel()
    parts = [p for p, s in (("weight", slice(0, n)), ("bias", slice(n, None)))
             if check._max_diff(flat[s], reference[s]) > tol]  # fmt: skip
    where = " and ".join(parts)
    return CheckResult(False, None, f"{result.message} (the {where} differs)", result.max_abs_diff)


def check_fold_into_next_linear(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(bn, linear) -> (weight, bias)``: the Linear equal to eval-mode bn, then linear.

    bn is an eval-mode float64 BatchNorm1d(4) (eps 1e-3, one running_var of 2e-4); linear a
    float64 Linear(4, 4) with a bias, then a Linear(4, 3) without one (the folded Linear
    still needs one). Returns weight (out_features, in_features) and bias (out_features,).
    """
    results = [_fold_next_case(fn, square, tol) for square in (True, False)]
    return _first_failure(results, "folded weight and bias match, with and without a bias")


# ---------------------------------------------------------------------------------
# 08 claims: zero-init of the last BN's gamma in residual blocks, group norm
# ---------------------------------------------------------------------------------


def _resnets() -> list[nn.Module]:
    """resnet18 (BasicBlock) and a slim Bottleneck ResNet, every BN's gamma and beta random."""
    from torchvision.models import resnet

    with _seeded(8):
        models = [
            resnet.resnet18(weights=None, num_classes=10),
            resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16),
        ]
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for model in models:
            for _name, bn in batchnorm_layers(model):
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return models


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchvision.models import resnet

    return layers(model, (resnet.BasicBlock, resnet.Bottleneck))


def _zeroed(model: nn.Module, variant: str | None = None) -> Tensor:
    """Every BN's (gamma, beta), as they should be after zero-init (or with one mistake)."""
    weights, biases = set(), set()
    for name, block in _blocks(model):
        last = f"{name}.bn3" if hasattr(block, "bn3") else f"{name}.bn2"
        (biases if variant == ZEROED_BETA else weights).add(
            f"{name}.bn1" if variant == ZEROED_FIRST_BN else last
        )
        if variant == ZEROED_DOWNSAMPLE_TOO and block.downsample is not None:
            weights.add(f"{name}.downsample.1")
    parts = []
    for name, bn in batchnorm_layers(model):
        zero_w = name in weights or variant == ZEROED_EVERY_GAMMA
        parts.append(torch.zeros_like(bn.weight) if zero_w else bn.weight.detach())
        parts.append(torch.zeros_like(bn.bias) if name in biases else bn.bias.detach())
    return torch.cat(parts).to(_F64)


def _bn_parameter_at(model: nn.Module) -> Callable[[tuple[int, ...]], str]:
    """Names the BN parameter at an index of :func:`_zeroed`'s flat vector."""

    def describe(index: tuple[int, ...]) -> str:
        start = 0
        for name, bn in batchnorm_layers(model):
            for part in ("weight", "bias"):
                if index[0] < start + bn.num_features:
                    return f"{name}.{part}[{index[0] - start}]"
                start += bn.num_features
        return f"entry {index[0]}"

    return describe


_ZERO_MISTAKES = (ZEROED_EVERY_GAMMA, ZEROED_BETA, ZEROED_FIRST_BN, ZEROED_DOWNSAMPLE_TOO)


def check_zero_init_last_gamma(fn: Callable) -> CheckResult:
    """Check ``fn(model)``: zero the gamma of each residual block's last BN, in place.

    Runs torchvision's resnet18 (BasicBlock: bn2) and a slim Bottleneck ResNet (bn3), all
    BN parameters made nonzero first; what ``zero_init_residual=True`` does at construction.
    """
    results = []
    for model in _resnets():
        reference = _zeroed(model)
        variants = {v: _zeroed(model, v) for v in _ZERO_MISTAKES}
        returned, error = _call(fn, model)
        if error is not None:
            return error
        model = returned if isinstance(returned, nn.Module) else model
        got = torch.cat([torch.cat([bn.weight, bn.bias]) for _n, bn in batchnorm_layers(model)])
        results.append(
            _diagnose(
                got.detach(),
                reference,
                variants,
                "BN parameters",
                0.0,
                HINTS,
                _reread("zero_init_last_gamma"),
                describe=_bn_parameter_at(model),
            )
        )
    return _first_failure(results, "exactly each residual block's last gamma is zero")


def _group_input() -> Tensor:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 6, 3, 3, generator=g, dtype=_F64)
    # the last group's channels have std 0.02 and 0.03 around the same mean: its variance,
    # about 7e-4, is close to eps = 1e-3, so where eps goes (and which eps) shows
    shift = torch.tensor([0.5, -2.0, 4.0, 1.0, 3.0, 3.02], dtype=_F64)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0, 0.02, 0.03], dtype=_F64)
    x = x * F.per_channel(scale, x) + F.per_channel(shift, x)
    return x + torch.arange(4, dtype=_F64).reshape(-1, 1, 1, 1)  # samples differ


def _group_norm(x: Tensor, groups: int, eps: float, variant: str | None = None) -> Tensor:
    n, c = x.shape[:2]
    if variant == GN_INTERLEAVED_GROUPS:
        xg = x.reshape(n, c // groups, groups, -1).transpose(1, 2).reshape(n, groups, -1)
    else:
        xg = x.reshape(n, groups, -1)
    dims = (0, 2) if variant == GN_OVER_BATCH else (2,)
    out = check.standardize(xg, dims, eps, variant if variant in check.NORMALIZE_MISTAKES else None)
    if variant == GN_INTERLEAVED_GROUPS:
        return out.reshape(n, groups, c // groups, -1).transpose(1, 2).reshape(x.shape)
    return out.reshape(x.shape)


def check_group_norm(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(x, groups, eps) -> out``: group norm without affine parameters.

    x is (4, 6, 3, 3) float64 with 3 groups, eps 1e-3; channels and samples have
    different means, and one group's variance is close to eps. The reference is
    ``torch.nn.functional.group_norm``.
    """
    x, groups, eps = _group_input(), 3, 1e-3
    got, error = _call(fn, x.clone(), groups, eps)
    if error is not None:
        return error
    if not isinstance(got, Tensor):
        return _fail(f"returned {type(got).__name__}, expected a tensor")
    reference = torch.nn.functional.group_norm(x, groups, eps=eps)
    variants = {
        v: _group_norm(x, groups, eps, v)
        for v in (GN_OVER_BATCH, GN_INTERLEAVED_GROUPS, *check.NORMALIZE_MISTAKES)
    }
    fallback = _reread("group_norm")
    return _diagnose(got, reference, variants, "group norm output", tol, HINTS, fallback)


# ---------------------------------------------------------------------------------
# Every notebook's exercises
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """An exercise: the function the learner writes, its checker, and keyword arguments
    that name other functions of the same namespace (03's backward needs its forward)."""

    function: str
    checker: Callable[..., CheckResult]
    uses: dict[str, str] = field(default_factory=dict)
    #: bnlab's names that solve it: the notebook shows none of them before the checker runs
    #: (``bnlab.teaching.path.answers_shown_early``)
    answers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.function

    def run(self, namespace: dict) -> CheckResult:
        """Check the learner's ``my_<function>`` in ``namespace`` (a notebook's name), or
        ``<function>`` (a solutions file's); a missing one fails and says which name."""
        found = {}
        for name in (self.function, *self.uses.values()):
            found[name] = next(
                (namespace[k] for k in (f"my_{name}", name) if namespace.get(k) is not None), None
            )
            if found[name] is None:
                return _fail(f"no function my_{name} (or {name}) defined yet: write it first")
        kwargs = {key: found[name] for key, name in self.uses.items()}
        return self.checker(found[self.function], **kwargs)


EXERCISES: dict[str, list[Exercise]] = {
    "01_concepts": [Exercise("batch_stats", check_batch_stats), Exercise("bn_eval", check_bn_eval)],
    "02_math": [
        Exercise(
            "bn_backward_dx",
            check_bn_backward_dx,
            answers=("batchnorm_backward_compact", "BatchNormFunction"),
        ),
        # identity_bn: the cell that sets gamma = sqrt(var + eps), beta = mean and prints them
        Exercise("identity_params", check_identity_params, answers=("identity_bn",)),
    ],
    "03_scratch": [
        Exercise(
            "bn_forward",
            check.check_forward,
            answers=("batchnorm_forward", "learner_forward_fixed", "bn_forward"),
        ),
        Exercise(
            "bn_backward",
            check.check_backward,
            {"forward": "bn_forward"},
            answers=("batchnorm_backward_compact", "bn_backward", "BNFunction"),
        ),
        Exercise(
            "running_stats_step",
            check.check_running_stats,
            answers=("update_running_stats", "update_running"),
        ),
    ],
    "04_numba_kernels": [
        Exercise("merge", check_merge, answers=("merge_moments",)),
        Exercise("welford_update", check_welford_update, answers=("thread_welford",)),
        Exercise("train_forward_bytes", check_train_forward_bytes),
    ],
    "05_lenet": [
        Exercise("t_interval", check_t_interval, answers=("mean_and_interval",)),
        Exercise("lenet_with_bn", check_lenet_bn, answers=("lenet",)),
    ],
    "06_pitfalls": [
        Exercise("predict", check_predict),
        Exercise("keras_to_torch", check_keras_to_torch, answers=("convert_momentum",)),
        Exercise("recalibrate", check_recalibrate, answers=("recalibrate_bn",)),
    ],
    "07_fusion": [
        Exercise("scale_shift", check_scale_shift, answers=("bn_scale_shift",)),
        Exercise("fold", check_fold, answers=("fold_bn",)),
        Exercise(
            "fold_into_next_linear",
            check_fold_into_next_linear,
            answers=("fold_bn_into_next_conv",),
        ),
    ],
    "08_claims": [
        Exercise(
            "zero_init_last_gamma", check_zero_init_last_gamma, answers=("zero_init_last_gamma",)
        ),
        Exercise("group_norm", check_group_norm, answers=("group_norm",)),
    ],
}


def check_all(namespace: dict, notebook: str) -> dict[str, CheckResult]:
    """Run every exercise of ``notebook`` (e.g. "05_lenet") on the functions in ``namespace``."""
    return {ex.function: ex.run(namespace) for ex in EXERCISES[notebook]}


# ---------------------------------------------------------------------------------
# 09 distributed: merging the replicas' statistics, ghost BN
# ---------------------------------------------------------------------------------

REPLICA_UNWEIGHTED_MEAN = "global mean as the plain average of the replicas' means"
REPLICA_NO_BETWEEN_TERM = "global variance without the between-replica term (mean_r - mean)^2"
REPLICA_AVERAGED_STATS = "the replicas' means and variances simply averaged"
REPLICA_UNBIASED_RESULT = "global variance divided by N - 1: BN normalizes with the biased one"
REPLICA_VARS_TAKEN_AS_UNBIASED = "replica variances taken as unbiased: M2_r = (n_r - 1) * var_r"
GHOST_WHOLE_BATCH = "normalized with the whole batch's statistics, not each virtual batch's"
GHOST_INTERLEAVED = "virtual batches taken interleaved (x[i::k]), not as contiguous chunks"

HINTS.update(
    {
        REPLICA_UNWEIGHTED_MEAN: "weigh each replica's mean by its count: sum(n_r * mean_r) / N",
        REPLICA_NO_BETWEEN_TERM: "each replica's variance is around its own mean: add "
        "sum(n_r * (mean_r - mean)^2) / N",
        REPLICA_AVERAGED_STATS: "replicas differ in size and in mean: weigh by counts and add "
        "the between-replica term",
        REPLICA_UNBIASED_RESULT: "return the biased variance (divide by N), the one BN uses",
        REPLICA_VARS_TAKEN_AS_UNBIASED: "the replicas report BN's biased variances: "
        "M2_r = n_r * var_r",
        GHOST_WHOLE_BATCH: "split x along N into chunks of virtual_batch_size first "
        "(x.split(virtual_batch_size)) and normalize each chunk with its own statistics",
        GHOST_INTERLEAVED: "virtual batches are contiguous: x.split(virtual_batch_size), "
        "the last one may be smaller",
    }
)

#: (count, mean (C,), biased var (C,)) of three replicas of different sizes and means
_REPLICAS = (
    (2, (0.5, -1.0, 3.0), (0.25, 4.0, 1.0)),
    (5, (1.5, 2.0, 3.5), (1.0, 0.5, 2.0)),
    (9, (-0.5, 0.0, 6.0), (2.0, 1.5, 0.1)),
)


def _replica_stats() -> list[tuple[int, Tensor, Tensor]]:
    return [(n, torch.tensor(m, dtype=_F64), torch.tensor(v, dtype=_F64)) for n, m, v in _REPLICAS]


def _merged_replicas(stats, variant: str | None = None) -> Tensor:
    counts = torch.tensor([float(n) for n, _, _ in stats], dtype=_F64).reshape(-1, 1)
    means = torch.stack([m for _, m, _ in stats])
    variances = torch.stack([v for _, _, v in stats])
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    if variant in (REPLICA_UNWEIGHTED_MEAN, REPLICA_AVERAGED_STATS):
        mean = means.mean(0)
    if variant == REPLICA_AVERAGED_STATS:
        return torch.stack([mean, variances.mean(0)])
    within = counts * variances
    if variant == REPLICA_VARS_TAKEN_AS_UNBIASED:
        within = (counts - 1) * variances
    between = counts * (means - mean) ** 2
    if variant == REPLICA_NO_BETWEEN_TERM:
        between = torch.zeros_like(between)
    divisor = total - 1 if variant == REPLICA_UNBIASED_RESULT else total
    return torch.stack([mean, (within + between).sum(0) / divisor])


def check_merge_replica_stats(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(stats) -> (mean, var)``: the global batch's per-channel mean and biased
    variance from each replica's ``(count, mean, var)`` (var biased, as BN computes it).

    Three replicas of 2, 5 and 9 examples, 3 channels, float64 tensors; what SyncBatchNorm's
    forward computes from the gathered statistics.
    """
    stats = _replica_stats()
    got, error = _call_results(
        fn, ([(n, m.clone(), v.clone()) for n, m, v in stats],), 2, "(mean, var)"
    )
    if error is not None:
        return error
    variants = {
        v: _merged_replicas(stats, v)
        for v in (
            REPLICA_UNWEIGHTED_MEAN,
            REPLICA_NO_BETWEEN_TERM,
            REPLICA_AVERAGED_STATS,
            REPLICA_UNBIASED_RESULT,
            REPLICA_VARS_TAKEN_AS_UNBIASED,
        )
    }
    reference = _merged_replicas(stats)
    return _diagnose(
        got,
        reference,
        variants,
        "the global (mean, var)",
        tol,
        HINTS,
        _reread("merge_replica_stats"),
        labels=("mean", "var"),
    )


def _ghost_input() -> Tensor:
    """(10, 3, 2, 2) float64 whose mean drifts along the batch (so the chunks show), with
    channel 2 at std about 0.03: its variance is close to the check's eps of 1e-3."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 3, 2, 2, generator=g, dtype=_F64)
    drift = torch.arange(10, dtype=_F64).reshape(-1, 1, 1, 1)
    scale = torch.tensor([2.0, 1.0, 0.01], dtype=_F64).reshape(1, -1, 1, 1)
    return (x * 2 + drift) * scale


def _ghost_bn(x: Tensor, size: int, eps: float, variant: str | None = None) -> Tensor:
    if variant == GHOST_WHOLE_BATCH:
        chunks = [torch.arange(len(x))]
    elif variant == GHOST_INTERLEAVED:
        k = -(-len(x) // size)
        chunks = [torch.arange(i, len(x), k) for i in range(k)]
    else:
        chunks = list(torch.arange(len(x)).split(size))
    out = torch.empty_like(x)
    for idx in chunks:
        part = x[idx]
        dims = check.wrong_axes(part).get(variant, F.reduce_dims(part))
        mistake = variant if variant in check.NORMALIZE_MISTAKES else None
        out[idx] = check.standardize(part, dims, eps, mistake)
    return out


def check_ghost_bn(fn: Callable, tol: float = 1e-6) -> CheckResult:
    """Check ``fn(x, virtual_batch_size, eps) -> out``: ghost BN's training forward without
    gamma and beta (Hoffer et al. 2017).

    x is (10, 3, 2, 2) float64 whose mean drifts along the batch; virtual batches of 4, so
    the chunks are 4, 4 and 2 examples; eps is 1e-3 and one channel's variance close to it.
    The reference is ``torch.nn.functional.batch_norm`` on each chunk.
    """
    x, size, eps = _ghost_input(), 4, 1e-3
    got, error = _call(fn, x.clone(), size, eps)
    if error is not None:
        return error
    if not isinstance(got, Tensor):
        return _fail(f"returned {type(got).__name__}, expected a tensor")
    reference = torch.cat(
        [
            torch.nn.functional.batch_norm(c, None, None, training=True, eps=eps)
            for c in x.split(size)
        ]
    )
    mistakes = (GHOST_WHOLE_BATCH, GHOST_INTERLEAVED, *check.NORMALIZE_MISTAKES, AXES_ALL)
    variants = {v: _ghost_bn(x, size, eps, v) for v in (*mistakes, AXES_PER_SAMPLE)}
    fallback = _reread("ghost_bn")
    return _diagnose(got.detach(), reference, variants, "ghost BN output", tol, HINTS, fallback)


EXERCISES["09_distributed"] = [
    Exercise("merge_replica_stats", check_merge_replica_stats, answers=("global_moments",)),
    Exercise("ghost_bn", check_ghost_bn, answers=("GhostBatchNorm2d",)),
]
