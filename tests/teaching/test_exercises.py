"""bnlab.teaching.exercises: every solution passes, every typical mistake is named, stubs fail.

The last tests load every ``solutions/NN_topic.py`` and run it through its checkers: this is
how CI runs the reference solutions.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

from bnlab.teaching import check
from bnlab.teaching import exercises as ex

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "solutions"


def load(stem: str):
    """A solutions file as a module (its name starts with a digit: load it by path)."""
    spec = importlib.util.spec_from_file_location(f"solution_{stem}", SOLUTIONS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dims_of(x):
    return (0,) + tuple(range(2, x.dim()))


def view(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


# ---------------------------------------------------------------------------------
# Wrong answers, one typical mistake each: {checker: {mistake: wrong function}}
# ---------------------------------------------------------------------------------


def stats_over(axes, unbiased=False):
    def fn(x):
        d = {"bn": dims_of(x), "all": tuple(range(x.dim())), "sample": None}.get(axes, axes)
        d = tuple(range(2 if x.dim() == 4 else 1, x.dim())) if d is None else d
        return x.mean(dim=d), x.var(dim=d, unbiased=unbiased)

    return fn


def bn_eval_with(batch=False, eps_outside=False, affine=True):
    def fn(x, rm, rv, gamma, beta, eps):
        if batch:
            rm, rv = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        std = view(rv, x).sqrt() + eps if eps_outside else (view(rv, x) + eps).sqrt()
        out = (x - view(rm, x)) / std
        return view(gamma, x) * out + view(beta, x) if affine else out

    return fn


def dx_with(kind):
    def fn(dout, x, gamma, eps):
        d = dims_of(x)
        std = (x.var(dim=d, keepdim=True, unbiased=False) + eps).sqrt()
        xhat = (x - x.mean(dim=d, keepdim=True)) / std
        mean_d = dout.mean(dim=d, keepdim=True)
        mean_dx = (dout * xhat).mean(dim=d, keepdim=True)
        inner = {"const": dout, "no_mean": dout - xhat * mean_dx, "no_var": dout - mean_d}[kind]
        return view(gamma, x) / std * inner

    return fn


def identity_with(kind):
    def fn(x, eps):
        d = dims_of(x)
        mean, var = x.mean(dim=d), x.var(dim=d, unbiased=kind == "unbiased")
        gamma = {
            "var": var,
            "invstd": (var + eps).rsqrt(),
            "no_eps": var.sqrt(),
        }.get(kind, (var + eps).sqrt())
        return gamma, torch.zeros_like(mean) if kind == "beta0" else mean

    return fn


def merge_with(kind):
    def fn(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n, delta = na + nb, mb - ma
        mean = (ma + mb) / 2 if kind == "unweighted" else ma + delta * nb / n
        corr = {"none": 0.0, "undivided": delta**2 * na * nb}.get(kind, delta**2 * na * nb / n)
        return n, mean, qa + qb + corr

    return fn


def welford_with(kind):
    def fn(state, x):
        n, mean, m2 = state
        new = mean + (x - mean) / (n + 1)
        m2 += (x - new) ** 2 if kind == "new" else (x - mean) ** 2
        return n + 1, new, m2

    return fn


def interval_with(kind):
    def fn(values, confidence=0.95):
        n = values.numel()
        std = values.std(unbiased=kind != "ddof0")
        q = 1.96 if kind == "z" else stats.t.ppf(0.5 + confidence / 2, n - 1)
        return values.mean(), q * std / (n if kind == "n" else math.sqrt(n))

    return fn


def lenet_with(kind):
    """LeNet with BN and one placement mistake."""

    def build():
        sol = load("05_lenet")
        layers = list(sol.lenet_with_bn())
        if kind == "bn1d_after_conv":
            layers[1] = nn.BatchNorm1d(6)
        elif kind == "features":
            layers[13] = nn.BatchNorm1d(80)
        elif kind == "after_last":
            layers.append(nn.BatchNorm1d(10))
        elif kind == "after_activation":
            layers[1], layers[2] = layers[2], layers[1]
        elif kind == "missing":
            del layers[13]
        return nn.Sequential(*layers)

    return build


def predict_with(kind):
    def fn(model, x):
        was = model.training
        if kind != "train":
            model.eval()
        with torch.no_grad():
            out = model(x)
        if kind == "forced":
            model.train()
        elif kind != "left":
            model.train(was)
        return out

    return fn


def recalibrate_with(kind):
    def fn(model, batches):
        was = model.training
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        for bn in bns:
            if kind != "no_reset":
                bn.reset_running_stats()
            if kind != "exponential":
                bn.momentum = None
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)
        for bn in bns:
            bn.momentum = None if kind == "momentum" else 0.1
        model.train(True if kind == "mode" else was)

    return fn


def fold_with(kind):
    def fn(conv, bn):
        var = bn.running_var
        std = {"no_eps": var.sqrt(), "var": var + bn.eps}.get(kind, (var + bn.eps).sqrt())
        scale = bn.weight.detach() / std
        b = conv.bias.detach() if conv.bias is not None and kind != "dropped" else 0 * scale
        bias = {
            "unscaled": b - bn.running_mean * scale + bn.bias,
            "twice": (b - bn.running_mean) * scale * scale + bn.bias,
        }.get(kind, (b - bn.running_mean) * scale + bn.bias)
        return conv.weight.detach() * scale.view(-1, 1, 1, 1), bias.detach()

    return fn


def scale_shift_with(kind):
    def fn(bn):
        var = bn.running_var
        std = {"no_eps": var.sqrt(), "var": var + bn.eps}.get(kind, (var + bn.eps).sqrt())
        scale = bn.weight.detach() / std
        mean = bn.running_mean if kind == "unscaled" else bn.running_mean * scale
        return scale, bn.bias.detach() - mean

    return fn


def fold_next_with(kind):
    def fn(bn, linear):
        var = bn.running_var
        std = {"no_eps": var.sqrt(), "var": var + bn.eps}.get(kind, (var + bn.eps).sqrt())
        scale = bn.weight.detach() / std
        shift = bn.bias.detach() - bn.running_mean * scale
        w = linear.weight.detach()
        keep = linear.bias is not None and kind != "dropped"
        b = linear.bias.detach() if keep else torch.zeros(w.shape[0], dtype=w.dtype)
        weight = w * scale[:, None] if kind == "rows" else w * scale
        through = {"as is": shift, "folded": (w * scale) @ shift, "transposed": w.T @ shift}
        return weight, b + through.get(kind, w @ shift)

    return fn


def zero_with(kind):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def fn(model):
        for m in model.modules():
            if kind == "all" and isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.weight)
            if not isinstance(m, (BasicBlock, Bottleneck)):
                continue
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
            if kind == "beta":
                nn.init.zeros_(last.bias)
            elif kind == "first":
                nn.init.zeros_(m.bn1.weight)
            elif kind == "downsample":
                nn.init.zeros_(last.weight)
                if m.downsample is not None:
                    nn.init.zeros_(m.downsample[1].weight)

    return fn


def group_norm_with(kind):
    def fn(x, groups, eps):
        n, c = x.shape[:2]
        if kind == "interleaved":
            xg = x.reshape(n, c // groups, groups, -1).transpose(1, 2).reshape(n, groups, -1)
        else:
            xg = x.reshape(n, groups, -1)
        d = (0, 2) if kind == "batch" else (2,)
        mean = xg.mean(dim=d, keepdim=True)
        out = (xg - mean) / (xg.var(dim=d, keepdim=True, unbiased=kind == "unbiased") + eps).sqrt()
        if kind == "interleaved":
            return out.reshape(n, groups, c // groups, -1).transpose(1, 2).reshape(x.shape)
        return out.reshape(x.shape)

    return fn


def replica_merge_with(mistake):
    def merge(stats):
        counts = torch.tensor([float(n) for n, _, _ in stats], dtype=torch.float64)[:, None]
        means = torch.stack([m for _, m, _ in stats])
        variances = torch.stack([v for _, _, v in stats])
        if mistake == "averaged":
            return means.mean(0), variances.mean(0)
        mean = means.mean(0) if mistake == "unweighted" else (counts * means).sum(0) / counts.sum()
        within = ((counts - 1) if mistake == "as unbiased" else counts) * variances
        between = 0 if mistake == "no between" else counts * (means - mean) ** 2
        divisor = counts.sum() - 1 if mistake == "unbiased" else counts.sum()
        return mean, (within + between).sum(0) / divisor

    return merge


def ghost_with(mistake):
    def ghost(x, size, eps=1e-5):
        if mistake == "whole":
            chunks = [x]
        elif mistake == "interleaved":
            k = -(-len(x) // size)  # as many virtual batches, but x[i::k] for each
            out = torch.empty_like(x)
            for i in range(k):
                out[i::k] = ghost_right(x[i::k], len(x), eps)
            return out
        else:
            chunks = x.split(size)
        return torch.cat(
            [
                (c - c.mean((0, 2, 3), keepdim=True))
                / (c.var((0, 2, 3), keepdim=True, unbiased=mistake == "unbiased") + eps).sqrt()
                for c in chunks
            ]  # fmt: skip
        )

    ghost_right = load("09_distributed").ghost_bn
    return ghost


WRONG = {
    ex.check_batch_stats: {
        ex.UNBIASED_VARIANCE: stats_over("bn", unbiased=True),
        ex.AXES_ALL: stats_over("all"),
        ex.AXES_PER_SAMPLE: stats_over("sample"),
        ex.AXES_BATCH_ONLY: stats_over((0,)),
    },
    ex.check_bn_eval: {
        ex.BATCH_STATS_IN_EVAL: bn_eval_with(batch=True),
        ex.EPS_OUTSIDE_SQRT: bn_eval_with(eps_outside=True),
        ex.AFFINE_MISSING: bn_eval_with(affine=False),
    },
    ex.check_bn_backward_dx: {
        ex.STATS_AS_CONSTANTS: dx_with("const"),
        ex.MISSING_MEAN_PATH: dx_with("no_mean"),
        ex.MISSING_VAR_PATH: dx_with("no_var"),
    },
    ex.check_identity_params: {
        ex.GAMMA_IS_VAR: identity_with("var"),
        ex.GAMMA_IS_INVSTD: identity_with("invstd"),
        ex.EPS_MISSING: identity_with("no_eps"),
        ex.BETA_ZERO: identity_with("beta0"),
        ex.UNBIASED_VARIANCE: identity_with("unbiased"),
    },
    ex.check_merge: {
        ex.MERGE_NO_CORRECTION: merge_with("none"),
        ex.MERGE_UNWEIGHTED_MEAN: merge_with("unweighted"),
        ex.MERGE_CORRECTION_NOT_DIVIDED: merge_with("undivided"),
    },
    ex.check_welford_update: {
        ex.WELFORD_NEW_MEAN_TWICE: welford_with("new"),
        ex.WELFORD_OLD_MEAN_TWICE: welford_with("old"),
    },
    ex.check_train_forward_bytes: {
        ex.TRAFFIC_ONE_READ: lambda shape, itemsize: 2 * math.prod(shape) * itemsize,
        ex.TRAFFIC_UNFUSED: lambda shape, itemsize: 7 * math.prod(shape) * itemsize,
        ex.TRAFFIC_ELEMENTS_NOT_BYTES: lambda shape, itemsize: 3 * math.prod(shape),
        ex.TRAFFIC_BELOW_MINIMUM: lambda shape, itemsize: math.prod(shape) * itemsize,
        ex.TRAFFIC_IGNORES_ITEMSIZE: lambda shape, itemsize: 3 * math.prod(shape) * 4,
        # three passes, then half a pass more: not (C,) vectors
        ex.TRAFFIC_VECTORS_TOO_LARGE: lambda shape, itemsize: 3.5 * math.prod(shape) * itemsize,
    },
    ex.check_t_interval: {
        ex.Z_INSTEAD_OF_T: interval_with("z"),
        ex.POPULATION_STD: interval_with("ddof0"),
        ex.DIVIDES_BY_N: interval_with("n"),
    },
    ex.check_lenet_bn: {
        ex.BN_WRONG_RANK: lenet_with("bn1d_after_conv"),
        ex.BN_WRONG_FEATURES: lenet_with("features"),
        ex.BN_AFTER_LAST_LINEAR: lenet_with("after_last"),
        ex.BN_MISSING: lenet_with("missing"),
    },
    ex.check_predict: {
        ex.PREDICT_TRAIN_MODE: predict_with("train"),
        ex.PREDICT_LEFT_IN_EVAL: predict_with("left"),
        ex.PREDICT_FORCED_TRAIN: predict_with("forced"),
    },
    ex.check_keras_to_torch: {
        ex.KERAS_MOMENTUM_COPIED: lambda momentum, epsilon: (momentum, epsilon),
        ex.EPS_CHANGED: lambda momentum, epsilon: (1 - momentum, 1e-5),
    },
    ex.check_recalibrate: {
        ex.RECAL_NO_RESET: recalibrate_with("no_reset"),
        ex.RECAL_EXPONENTIAL: recalibrate_with("exponential"),
        ex.RECAL_MODE_NOT_RESTORED: recalibrate_with("mode"),
        ex.RECAL_MOMENTUM_NOT_RESTORED: recalibrate_with("momentum"),
    },
    ex.check_scale_shift: {
        ex.FOLD_EPS_MISSING: scale_shift_with("no_eps"),
        ex.FOLD_VAR_NOT_STD: scale_shift_with("var"),
        ex.SHIFT_MEAN_NOT_SCALED: scale_shift_with("unscaled"),
    },
    ex.check_fold: {
        ex.FOLD_EPS_MISSING: fold_with("no_eps"),
        ex.FOLD_VAR_NOT_STD: fold_with("var"),
        ex.FOLD_CONV_BIAS_DROPPED: fold_with("dropped"),
        ex.FOLD_BIAS_NOT_SCALED: fold_with("unscaled"),
        ex.FOLD_BIAS_SCALED_TWICE: fold_with("twice"),
    },
    ex.check_fold_into_next_linear: {
        ex.FOLD_EPS_MISSING: fold_next_with("no_eps"),
        ex.FOLD_VAR_NOT_STD: fold_next_with("var"),
        ex.NEXT_SCALE_ON_OUTPUTS: fold_next_with("rows"),
        ex.NEXT_SHIFT_NOT_THROUGH_WEIGHT: fold_next_with("as is"),
        ex.NEXT_SHIFT_THROUGH_FOLDED_WEIGHT: fold_next_with("folded"),
        ex.NEXT_SHIFT_TRANSPOSED: fold_next_with("transposed"),
        ex.NEXT_BIAS_DROPPED: fold_next_with("dropped"),
    },
    ex.check_zero_init_last_gamma: {
        ex.ZEROED_EVERY_GAMMA: zero_with("all"),
        ex.ZEROED_BETA: zero_with("beta"),
        ex.ZEROED_FIRST_BN: zero_with("first"),
        ex.ZEROED_DOWNSAMPLE_TOO: zero_with("downsample"),
    },
    ex.check_group_norm: {
        ex.GN_OVER_BATCH: group_norm_with("batch"),
        ex.GN_INTERLEAVED_GROUPS: group_norm_with("interleaved"),
        ex.UNBIASED_VARIANCE: group_norm_with("unbiased"),
    },
    ex.check_merge_replica_stats: {
        ex.REPLICA_UNWEIGHTED_MEAN: replica_merge_with("unweighted"),
        ex.REPLICA_NO_BETWEEN_TERM: replica_merge_with("no between"),
        ex.REPLICA_AVERAGED_STATS: replica_merge_with("averaged"),
        ex.REPLICA_UNBIASED_RESULT: replica_merge_with("unbiased"),
        ex.REPLICA_VARS_TAKEN_AS_UNBIASED: replica_merge_with("as unbiased"),
    },
    ex.check_ghost_bn: {
        ex.GHOST_WHOLE_BATCH: ghost_with("whole"),
        ex.GHOST_INTERLEAVED: ghost_with("interleaved"),
        ex.UNBIASED_VARIANCE: ghost_with("unbiased"),
    },
}

# ---------------------------------------------------------------------------------
# The catalogue's mistakes (bnlab.teaching.check), in every checker they fit
# ---------------------------------------------------------------------------------

EPS_KINDS = {
    ex.UNBIASED_VARIANCE: "unbiased",
    ex.EPS_OUTSIDE_SQRT: "outside",
    ex.EPS_MISSING: "no_eps",
    ex.EPS_HARD_CODED: "1e-5",
}


def std_with(var, eps, kind=None):
    return {
        "outside": lambda: var.sqrt() + eps,
        "no_eps": var.sqrt,
        "1e-5": lambda: (var + 1e-5).sqrt(),
    }.get(kind, lambda: (var + eps).sqrt())()


def normalized(x, dims, eps, mistake=None):
    """(x - mean) / std over dims, with one of the catalogue's normalization mistakes."""
    kind = EPS_KINDS.get(mistake)
    var = x.var(dim=dims, keepdim=True, unbiased=kind == "unbiased")
    return (x - x.mean(dim=dims, keepdim=True)) / std_with(var, eps, kind)


def axes_for(x, mistake):
    per_sample = tuple(range(1 if x.dim() == 2 else 2, x.dim()))
    return {ex.AXES_ALL: tuple(range(x.dim())), ex.AXES_PER_SAMPLE: per_sample}.get(
        mistake, {ex.AXES_BATCH_ONLY: (0,)}.get(mistake, dims_of(x))
    )


def dx_mistake(mistake):
    """dx through autograd of a forward with one catalogue mistake."""

    def fn(dout, x, gamma, eps):
        x = x.clone().requires_grad_(True)
        g = 1.0 if mistake == ex.GAMMA_MISSING else view(gamma, x)
        out = g * normalized(x, axes_for(x, mistake), eps, mistake)
        return torch.autograd.grad(out, x, dout)[0]

    return fn


def identity_mistake(mistake):
    def fn(x, eps):
        d = axes_for(x, mistake)
        var = x.var(dim=d, unbiased=mistake == ex.UNBIASED_VARIANCE)
        return std_with(var, eps, EPS_KINDS.get(mistake)), x.mean(dim=d)

    return fn


def bn_eval_mistake(mistake):
    def fn(x, rm, rv, gamma, beta, eps):
        out = (x - view(rm, x)) / std_with(view(rv, x), eps, EPS_KINDS.get(mistake))
        g = 1.0 if mistake == ex.GAMMA_MISSING else view(gamma, x)
        return g * out + (0.0 if mistake == ex.BETA_MISSING else view(beta, x))

    return fn


def bn_scale_mistake(bn, mistake):
    gamma = 1.0 if mistake == ex.GAMMA_MISSING else bn.weight.detach()
    return gamma / std_with(bn.running_var, bn.eps, EPS_KINDS.get(mistake))


def scale_shift_mistake(mistake):
    def fn(bn):
        scale = bn_scale_mistake(bn, mistake)
        return scale, bn.bias.detach() - bn.running_mean * scale

    return fn


def fold_mistake(mistake):
    def fn(conv, bn):
        scale = bn_scale_mistake(bn, mistake)
        b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
        return conv.weight.detach() * scale.view(-1, 1, 1, 1), (
            b - bn.running_mean
        ) * scale + bn.bias.detach()

    return fn


def group_norm_mistake(mistake):
    def fn(x, groups, eps):
        xg = x.reshape(x.shape[0], groups, -1)
        return normalized(xg, (2,), eps, mistake).reshape(x.shape)

    return fn


def ghost_mistake(mistake):
    def fn(x, size, eps):
        return torch.cat([normalized(c, axes_for(c, mistake), eps, mistake) for c in x.split(size)])

    return fn


NORMALIZING = (ex.UNBIASED_VARIANCE, ex.EPS_OUTSIDE_SQRT, ex.EPS_MISSING, ex.EPS_HARD_CODED)
CATALOGUE_WRONG = {
    ex.check_bn_eval: {
        m: bn_eval_mistake(m)
        for m in (ex.EPS_MISSING, ex.EPS_HARD_CODED, ex.GAMMA_MISSING, ex.BETA_MISSING)
    },
    ex.check_bn_backward_dx: {
        m: dx_mistake(m) for m in (*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE, ex.GAMMA_MISSING)
    },
    ex.check_identity_params: {
        m: identity_mistake(m)
        for m in (*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE, ex.AXES_BATCH_ONLY)
    },
    ex.check_scale_shift: {
        m: scale_shift_mistake(m)
        for m in (ex.EPS_OUTSIDE_SQRT, ex.EPS_HARD_CODED, ex.GAMMA_MISSING)
    },
    ex.check_fold: {
        m: fold_mistake(m) for m in (ex.EPS_OUTSIDE_SQRT, ex.EPS_HARD_CODED, ex.GAMMA_MISSING)
    },
    ex.check_group_norm: {m: group_norm_mistake(m) for m in NORMALIZING},
    ex.check_ghost_bn: {
        m: ghost_mistake(m) for m in (*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE)
    },
}
for _checker, _wrong in CATALOGUE_WRONG.items():
    WRONG[_checker].update(_wrong)

#: each checker's function against the catalogue: the mistakes it must name
CATALOGUE_FITS = {
    ex.check_batch_stats: {ex.UNBIASED_VARIANCE, ex.AXES_ALL, ex.AXES_PER_SAMPLE},
    ex.check_bn_eval: {
        ex.EPS_OUTSIDE_SQRT,
        ex.EPS_MISSING,
        ex.EPS_HARD_CODED,
        ex.GAMMA_MISSING,
        ex.BETA_MISSING,
    },
    ex.check_bn_backward_dx: {*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE, ex.GAMMA_MISSING},
    ex.check_identity_params: {*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE},
    ex.check_scale_shift: {
        ex.EPS_OUTSIDE_SQRT,
        ex.EPS_MISSING,
        ex.EPS_HARD_CODED,
        ex.GAMMA_MISSING,
    },
    ex.check_fold: {ex.EPS_OUTSIDE_SQRT, ex.EPS_MISSING, ex.EPS_HARD_CODED, ex.GAMMA_MISSING},
    ex.check_group_norm: set(NORMALIZING),
    ex.check_ghost_bn: {*NORMALIZING, ex.AXES_ALL, ex.AXES_PER_SAMPLE},
}

CHECKERS = [(nb, e) for nb, exs in ex.EXERCISES.items() for e in exs]
OWN = [(nb, e) for nb, e in CHECKERS if e.checker.__module__ == ex.__name__]
MISTAKES = [(c, m) for c, wrong in WRONG.items() for m in wrong]


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------


def test_every_notebook_has_two_to_four_exercises():
    notebooks = (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
    stems = sorted(p.stem for p in notebooks if p.stem != "10_errata")  # the appendix has none
    assert sorted(ex.EXERCISES) == stems
    for stem, exercises in ex.EXERCISES.items():
        assert 2 <= len(exercises) <= 4, stem


def test_every_own_checker_has_its_typical_mistakes_tested():
    assert {e.checker for _nb, e in OWN} == set(WRONG)
    for wrong in WRONG.values():
        assert len(wrong) >= 2


@pytest.mark.parametrize(
    "notebook, exercise", CHECKERS, ids=[f"{nb}-{e.function}" for nb, e in CHECKERS]
)
def test_the_solution_passes(notebook, exercise):
    result = exercise.run(vars(load(notebook)))
    assert result.passed and result.mistake is None, result
    assert "PASS" in repr(result)


@pytest.mark.parametrize(
    "checker, mistake", MISTAKES, ids=[f"{c.__name__}-{m}" for c, m in MISTAKES]
)
def test_each_typical_mistake_is_named(checker, mistake):
    result = checker(WRONG[checker][mistake])
    assert not result.passed
    assert result.mistake == mistake, result
    assert "Hint" in result.message and ex.HINTS[mistake] in result.message


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


@pytest.mark.parametrize("notebook, exercise", OWN, ids=[e.function for _nb, e in OWN])
def test_a_stub_is_not_attempted_yet(notebook, exercise):
    result = exercise.checker(stub)
    assert not result.passed and result.mistake is None
    assert result.message.startswith("not attempted yet")


def test_check_py_stubs_are_not_attempted_yet_too():
    for result in (check.check_forward(stub), check.check_running_stats(stub)):
        assert not result.passed and "not attempted yet" in result.message


@pytest.mark.parametrize("notebook, exercise", OWN, ids=[e.function for _nb, e in OWN])
def test_other_wrong_code_is_a_generic_failure(notebook, exercise):
    def raises(*args):
        raise RuntimeError("boom")

    result = exercise.checker(raises)
    assert not result.passed and "RuntimeError: boom" in result.message


def test_unrelated_wrong_answers_match_no_mistake():
    assert ex.check_batch_stats(lambda x: (x.mean(), x.std())).mistake is None
    result = ex.check_group_norm(lambda x, g, eps: torch.tanh(x))
    assert not result.passed and result.mistake is None
    assert "none of the typical mistakes" in result.message
    assert not ex.check_merge(lambda a, b: (1, 2)).passed  # a 2-tuple, not 3
    assert not ex.check_fold(lambda conv, bn: (conv.weight, None)).passed


def test_the_fold_into_next_linear_checker_says_which_part_differs_and_checks_shapes():
    right = load("07_fusion").fold_into_next_linear

    def bias_off(bn, linear):
        weight, bias = right(bn, linear)
        return weight, bias + 0.5

    result = ex.check_fold_into_next_linear(bias_off)
    assert not result.passed and result.mistake is None
    assert "the bias differs" in result.message and "solutions" not in result.message
    transposed = ex.check_fold_into_next_linear(
        lambda bn, lin: (right(bn, lin)[0].T, right(bn, lin)[1])
    )
    assert not transposed.passed and "the weight differs" in transposed.message
    flat = ex.check_fold_into_next_linear(
        lambda bn, lin: (right(bn, lin)[0].flatten(), right(bn, lin)[1])
    )
    assert not flat.passed and "(out_features, in_features)" in flat.message
    no_bias = ex.check_fold_into_next_linear(lambda bn, lin: (right(bn, lin)[0], None))
    assert not no_bias.passed and "a bias even when" in no_bias.message


@pytest.mark.parametrize("notebook, exercise", CHECKERS, ids=[e.function for _nb, e in CHECKERS])
def test_checkers_leave_the_global_generator_alone(notebook, exercise):
    # (their speed is not asserted here: tests check behaviour, never wall-clock time)
    namespace = vars(load(notebook))
    state = torch.random.get_rng_state()
    exercise.run(namespace)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_keepdim_and_float_results_are_accepted():
    def keepdim_stats(x):
        d = dims_of(x)
        return x.mean(dim=d, keepdim=True), x.var(dim=d, keepdim=True, unbiased=False)

    assert ex.check_batch_stats(keepdim_stats).passed
    assert ex.check_merge(
        lambda a, b: tuple(torch.tensor(v) for v in load("04_numba_kernels").merge(a, b))
    ).passed


def test_other_right_answers_pass():
    """torch's own implementations, and precise BN's pooled statistics, are right too."""
    assert ex.check_group_norm(lambda x, g, eps: torch.nn.functional.group_norm(x, g, eps=eps))

    def update_bn(model, batches):
        torch.optim.swa_utils.update_bn(batches, model)

    assert ex.check_recalibrate(update_bn).passed
    from bnlab.recalibrate import recalibrate_bn

    assert ex.check_recalibrate(lambda model, batches: recalibrate_bn(model, batches)).passed

    def eval_bn(x, rm, rv, gamma, beta, eps):
        return torch.nn.functional.batch_norm(x, rm, rv, gamma, beta, False, 0.1, eps)

    assert ex.check_bn_eval(eval_bn).passed
    from bnlab import models

    assert ex.check_lenet_bn(lambda: models.lenet(bn="torch")).passed
    assert ex.check_lenet_bn(models.lenet(bn="bnlab", activation="relu")).passed


def test_the_lenet_checker_accepts_bn_before_or_after_the_activation():
    """Notebook 05 does not resolve a difference between the placements: both pass."""
    from bnlab import models

    assert ex.check_lenet_bn(lenet_with("after_activation")).passed
    after = models.lenet(bn="torch", activation="relu", bn_position="after")
    assert ex.check_lenet_bn(after).passed
    layers = list(lenet_with("after_activation")())
    layers[2] = nn.BatchNorm1d(
        6
    )  # conv -> sigmoid -> BatchNorm1d: the wrong rank, after the activation
    assert ex.check_lenet_bn(nn.Sequential(*layers)).mistake == ex.BN_WRONG_RANK


def test_the_dx_checker_runs_4d_input_too():
    sol = load("02_math")
    assert ex.check_bn_backward_dx(sol.bn_backward_dx, ndim=4).passed
    assert ex.check_bn_backward_dx(dx_with("no_var"), ndim=4).mistake == ex.MISSING_VAR_PATH
    with pytest.raises(ValueError):
        ex.check_bn_backward_dx(sol.bn_backward_dx, ndim=3)


def test_zero_init_matches_torchvisions_zero_init_residual():
    from torchvision.models import resnet18

    model, reference = resnet18(num_classes=10), resnet18(num_classes=10, zero_init_residual=True)
    load("08_claims").zero_init_last_gamma(model)
    zeros = {n for n, p in model.named_parameters() if not p.any()}
    assert zeros == {n for n, p in reference.named_parameters() if not p.any()}


def test_learner_code_that_mutates_its_arguments_does_not_change_the_checkers_inputs():
    fold = load("07_fusion").fold

    def mutating_fold(conv, bn):
        conv.weight.data.mul_(2)
        bn.running_var.data.add_(1)
        return fold(conv, bn)

    def mutating_stats(x):
        x.mul_(3)
        return torch.zeros(3), torch.ones(3)

    def mutating_eval(x, rm, rv, gamma, beta, eps):
        rm.add_(1), gamma.mul_(0)
        return x

    for checker, wrong in (
        (ex.check_fold, mutating_fold),
        (ex.check_batch_stats, mutating_stats),
        (ex.check_bn_eval, mutating_eval),
    ):
        assert not checker(wrong).passed
    assert ex.check_fold(fold).passed
    assert ex.check_batch_stats(load("01_concepts").batch_stats).passed
    assert ex.check_bn_eval(load("01_concepts").bn_eval).passed


# ---------------------------------------------------------------------------------
# CI runs the reference solutions through their checkers
# ---------------------------------------------------------------------------------


def test_every_notebook_has_a_solutions_file_and_a_readme():
    files = sorted(p.stem for p in SOLUTIONS.glob("[0-9][0-9]_*.py"))
    assert files == sorted(ex.EXERCISES)
    assert "try" in (SOLUTIONS / "README.md").read_text().lower()


@pytest.mark.parametrize("stem", sorted(ex.EXERCISES))
def test_each_solutions_file_passes_all_its_checkers(stem):
    module = load(stem)
    functions = {e.function for e in ex.EXERCISES[stem]}
    assert functions <= set(vars(module)), (
        f"solutions/{stem}.py lacks {functions - set(vars(module))}"
    )
    results = ex.check_all(vars(module), stem)
    failed = {name: r for name, r in results.items() if not r.passed}
    assert not failed, failed
    for name in functions:
        assert getattr(module, name).__doc__, f"solutions/{stem}.py: {name} has no docstring"


@pytest.mark.parametrize("stem", sorted(ex.EXERCISES))
def test_solution_bodies_do_not_import_bnlab(stem):
    """The reference solutions are what a learner writes: torch only (bnlab runs them)."""
    text = (SOLUTIONS / f"{stem}.py").read_text()
    body, _, main = text.partition('if __name__ == "__main__":')
    assert "bnlab" not in body.replace("bnlab.check", "").split('"""', 2)[-1]
    assert "exercises.check_all" in main


def test_replica_and_ghost_checkers_fail_wrong_types_without_a_mistake():
    assert not ex.check_merge_replica_stats(lambda stats: 3.0).passed
    assert not ex.check_ghost_bn(lambda x, size, eps: [1.0]).passed


# ---------------------------------------------------------------------------------
# A learner alone: one catalogue, fallbacks that point into the notebook, clear messages
# ---------------------------------------------------------------------------------


def test_the_catalogue_is_applied_by_every_checker_it_fits():
    for checker, mistakes in CATALOGUE_FITS.items():
        assert mistakes <= set(WRONG[checker]), (checker.__name__, mistakes - set(WRONG[checker]))
    assert ex.FOLD_EPS_MISSING == ex.EPS_MISSING  # one name, one hint per mistake


def test_every_check_that_takes_an_eps_passes_one_other_than_the_default():
    """A function that ignores its eps argument (1e-5 hard-coded) fails, by name."""
    assert ex.check_ghost_bn(
        lambda x, size, eps: load("09_distributed").ghost_bn(x, size)
    ).mistake == (ex.EPS_HARD_CODED)
    sol = load("08_claims")
    assert (
        ex.check_group_norm(lambda x, g, eps: sol.group_norm(x, g, 1e-5)).mistake
        == ex.EPS_HARD_CODED
    )


def unrelated_answers():
    """A wrong answer per checker that matches no typical mistake."""
    s01, s02, s09 = load("01_concepts"), load("02_math"), load("09_distributed")
    return {
        ex.check_batch_stats: lambda x: (s01.batch_stats(x)[0] + 0.5, s01.batch_stats(x)[1]),
        ex.check_bn_eval: lambda *a: s01.bn_eval(*a) * 1.01,
        ex.check_bn_backward_dx: lambda *a: s02.bn_backward_dx(*a) * 1.01,
        ex.check_identity_params: lambda x, eps: (torch.ones(3), torch.ones(3)),
        ex.check_merge: lambda a, b: (a[0] + b[0], 5.0, 3.0),
        ex.check_welford_update: lambda state, x: (state[0] + 1, state[1] + 1, state[2]),
        ex.check_t_interval: lambda values, confidence=0.95: (values.mean(), 1.0),
        ex.check_fold: lambda conv, bn: (conv.weight * 2, torch.zeros(4)),
        ex.check_group_norm: lambda x, g, eps: torch.tanh(x),
        ex.check_merge_replica_stats: lambda stats: (torch.zeros(3), torch.ones(3)),
        ex.check_ghost_bn: lambda x, size, eps: s09.ghost_bn(x, size, eps) + 0.01,
    }


@pytest.mark.parametrize("checker", list(unrelated_answers()), ids=lambda c: c.__name__)
def test_the_fallback_says_where_it_differs_and_which_section_to_reread(checker):
    result = checker(unrelated_answers()[checker])
    assert not result.passed and result.mistake is None, result
    assert "differs most at" in result.message and "reread the section" in result.message
    assert "solution" not in result.message and "batchnorm_forward" not in result.message
    assert "/ reference" not in result.message and "/ half_width" not in result.message


def test_each_section_to_reread_is_a_heading_of_its_notebook():
    for function, (stem, section) in ex.SECTIONS.items():
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        headings = [
            line
            for cell in nb["cells"]
            if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines()
            if line.startswith("#")
        ]
        assert any(section in h for h in headings), f"{stem}: no heading '{section}' ({function})"
    assert {e.function for exs in ex.EXERCISES.values() for e in exs} - {
        "train_forward_bytes",  # its messages name the passes; the kernels notebook's own
        "lenet_with_bn",  # names the layer that is wrong
        "fold_into_next_linear",
    } <= set(ex.SECTIONS)


def test_the_bytes_checker_refuses_any_count_below_the_minimum_and_never_gives_the_answer():
    def passes(k, extra=0):
        return lambda shape, itemsize: k * math.prod(shape) * itemsize + extra

    assert ex.check_train_forward_bytes(passes(3, extra=4 * 32)).passed  # (C,) vectors on top
    for wrong in (passes(3, extra=-1), passes(2.5), passes(2), passes(1), passes(4), passes(7)):
        result = ex.check_train_forward_bytes(wrong)
        assert not result.passed
        answer = str(3 * 64 * 32 * 28 * 28 * 4)
        assert "3 passes" not in result.message and answer not in result.message
    below = ex.check_train_forward_bytes(passes(3, extra=-1)).message
    assert "below the minimum" in below and "no cache reuse" in below
    assert "reread the section" in ex.check_train_forward_bytes(passes(4)).message


def test_the_bytes_checker_accepts_float64_statistics_on_top_of_the_passes():
    def with_vectors(count, width):
        def traffic(shape, itemsize):
            vectors = count * shape[1] * max(itemsize, width)
            return 3 * math.prod(shape) * itemsize + vectors

        return traffic

    # the CPU kernel's mean and invstd are float64: (C,) vectors at 8 bytes, even for float16
    assert ex.check_train_forward_bytes(with_vectors(ex.TRAFFIC_VECTORS, 8)).passed
    too_many = ex.check_train_forward_bytes(with_vectors(ex.TRAFFIC_VECTORS + 1, 8))
    assert too_many.mistake == ex.TRAFFIC_VECTORS_TOO_LARGE
    assert "passes" not in too_many.message  # its passes are right: no misleading count
    assert f"at most {ex.TRAFFIC_VECTORS} vectors" in too_many.message


def test_no_bytes_checker_failure_prints_a_number_the_answer_follows_from():
    def passes(k, extra=0):
        return lambda shape, itemsize: k * math.prod(shape) * itemsize + extra

    wrongs = [passes(k) for k in (0, 1, 2, 2.5, 4, 5, 6, 7, 8, 9, 10)]
    wrongs += [passes(3, extra=e) for e in (-4096, -1, 10**6)]
    wrongs += [lambda shape, itemsize: 3 * math.prod(shape) * 4, lambda shape, itemsize: "3"]
    for wrong in wrongs:
        result = ex.check_train_forward_bytes(wrong)
        assert not result.passed
        printed = repr(result)
        # got - diff (or got + diff) would be the expected count
        assert "diff" not in printed and result.max_abs_diff == float("inf"), printed
        numbers = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", printed)}
        for shape, itemsize in (((64, 32, 28, 28), 4), ((128, 256), 2)):
            got = wrong(shape, itemsize)
            answer = 3 * math.prod(shape) * itemsize
            assert answer not in numbers, printed
            if isinstance(got, (int, float)):
                # the distance from the learner's count, unless it is a number they gave
                given = {float(got), float(itemsize), *map(float, shape)}
                assert abs(got - answer) not in numbers - given, printed


def test_garbled_messages_are_fixed():
    merge = ex.check_merge(lambda a, b: (a[0] + b[0], 5.0, 3.0)).message
    assert merge.startswith("the merged (count, mean, M2) differs") and "at M2" in merge
    welford = ex.check_welford_update(lambda state, x: (state[0] + 1, state[1] + 1, state[2]))
    assert welford.message.startswith("the (count, mean, M2) after each step differs")
    shape = ex.check_identity_params(lambda x, eps: (torch.ones(4), torch.ones(4))).message
    assert shape.startswith("gamma and beta have shape (4,) each, expected (3,)")
    short = ex.check_merge(lambda a, b: (1, 2)).message
    assert short.startswith("must return a tuple of 3 values (count, mean, M2), got 2 values")
    assert "got int" in ex.check_merge(lambda a, b: 3).message


def test_float32_answers_pass_where_float64_is_not_essential():
    s02, s09, s01 = load("02_math"), load("09_distributed"), load("01_concepts")

    def dx32(dout, x, gamma, eps):
        return s02.bn_backward_dx(dout.float(), x.float(), gamma.float(), eps)

    assert ex.check_bn_backward_dx(dx32).passed
    assert "float32" in ex.check_bn_backward_dx(dx32).message
    assert ex.check_ghost_bn(lambda x, size, eps: s09.ghost_bn(x.float(), size, eps)).passed
    assert ex.check_batch_stats(lambda x: tuple(v.float() for v in s01.batch_stats(x))).passed

    def merge32(stats):
        return tuple(v.float() for v in s09.merge_replica_stats(stats))

    assert ex.check_merge_replica_stats(merge32).passed
    # a float32 answer with a mistake is still named
    wrong = CATALOGUE_WRONG[ex.check_bn_backward_dx][ex.UNBIASED_VARIANCE]
    result = ex.check_bn_backward_dx(lambda d, x, g, e: wrong(d.float(), x.float(), g.float(), e))
    assert result.mistake == ex.UNBIASED_VARIANCE


def test_check_all_finds_the_notebooks_my_names_or_says_which_is_missing():
    sol = load("09_distributed")
    results = ex.check_all({"my_merge_replica_stats": sol.merge_replica_stats}, "09_distributed")
    assert results["merge_replica_stats"].passed
    missing = results["ghost_bn"]
    assert not missing.passed and "my_ghost_bn" in missing.message
    s03 = load("03_scratch")
    namespace = {"my_bn_forward": s03.bn_forward, "my_bn_backward": s03.bn_backward}
    assert ex.check_all(namespace, "03_scratch")["bn_backward"].passed
    # a notebook's my_ function wins over bnlab's function of the same name
    wrong = {"group_norm": load("08_claims").group_norm, "my_group_norm": lambda x, g, e: x}
    assert not ex.EXERCISES["08_claims"][1].run(wrong).passed


def test_identity_params_names_gamma_set_to_var_plus_eps():
    def var_plus_eps(x, eps):
        mean, var = ex.F.batch_stats(x)
        return var + eps, mean

    result = ex.check_identity_params(var_plus_eps)
    assert not result.passed and result.mistake == ex.GAMMA_IS_VAR_EPS
