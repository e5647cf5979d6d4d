"""Repeated training runs: over seeds, learning rates or init scales, with summaries.

Every run builds a fresh model after seeding (so seed s always means the same initial
weights and the same batch order), trains it with ``bnlab.train.fit`` and keeps its
``History``. Summaries turn a list of histories into mean and standard deviation per
epoch, and a sweep into the range of values in which training works.

Serves notebooks 05 and 08.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments.train import History, ProgressBar, fit


def train_seeds(
    make_model: Callable[[], nn.Module],
    data,
    seeds: Iterable[int],
    epochs: int,
    lr: float,
    progress: bool = True,
    desc: str = "seeds",
    **fit_kwargs,
) -> list[History]:
    """One ``fit`` per seed: seed, build ``make_model()``, train; the histories in seed order."""
    runs = sweep(
        [lr], lambda _lr: make_model(), data, epochs, lr, seeds, progress, desc, **fit_kwargs
    )
    return runs[lr]


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) over axis 0, the runs."""
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), std


def mean_std(histories: Sequence[History], key: str = "test_acc") -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean and sample standard deviation (ddof=1; 0 for one run) of ``key``.

    Returns two arrays of shape (epochs,).
    """
    if not histories:
        raise ValueError("mean_std needs at least one history")
    return _mean_std(np.array([getattr(h, key) for h in histories], dtype=float))  # (runs, epochs)


def sweep(
    values: Sequence[float],
    make_model: Callable[[float], nn.Module],
    data,
    epochs: int,
    lr: float | Callable[[float], float],
    seeds: Iterable[int] = (0,),
    progress: bool = True,
    desc: str = "sweep",
    **fit_kwargs,
) -> dict[float, list[History]]:
    """Train for each value in ``values`` and each seed; value -> histories (seed order).

    make_model(value) builds the model (e.g. with an init scale); ``lr`` is a number or
    a function of the value (a learning-rate sweep passes ``lr=lambda v: v``).
    """
    seeds = list(seeds)
    lr_of = lr if callable(lr) else (lambda _v: lr)
    results: dict[float, list[History]] = {}
    bar = ProgressBar(total=len(values) * len(seeds), desc=desc, disable=not progress)
    for value in values:
        results[value] = []
        for seed in seeds:
            seed_everything(seed)
            model = make_model(value)
            h = fit(model, data, epochs, lr_of(value), seed=seed, progress=False, **fit_kwargs)
            results[value].append(h)
            bar.update()
    bar.close()
    return results


def lr_sweep(
    lrs: Sequence[float],
    make_model: Callable[[], nn.Module],
    data,
    epochs: int,
    seeds: Iterable[int] = (0,),
    progress: bool = True,
    desc: str = "lr",
    **fit_kwargs,
) -> dict[float, list[History]]:
    """``sweep`` over learning rates: the same model for each lr; lr -> histories."""
    return sweep(
        lrs,
        lambda _lr: make_model(),
        data,
        epochs,
        lambda v: v,
        seeds,
        progress,
        desc,
        **fit_kwargs,
    )


def final_accuracy(results: dict[float, list[History]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the final test accuracy, one entry per swept value."""
    stats = [_mean_std(np.array([h.final_test_acc for h in hs])) for hs in results.values()]
    return np.array([m for m, _ in stats]), np.array([s for _, s in stats])


def best_value(results: dict[float, list[History]]) -> tuple[float, float]:
    """The swept value with the highest mean final test accuracy, and that accuracy.

    Ties go to the first value in sweep order. A fair comparison picks each model's best
    learning rate from the same grid this way and reports both numbers.
    """
    accuracies, _ = final_accuracy(results)
    index = int(np.argmax(accuracies))
    return list(results)[index], float(accuracies[index])


def _lentz(num: float, d: float, c: float) -> tuple[float, float]:
    tiny = 1e-300
    d = 1.0 + num * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + num / c
    return d, (c if abs(c) > tiny else tiny)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes)."""
    d, c = _lentz(-(a + b) * x / (a + 1.0), 1.0, 1.0)
    c, h = 1.0, d
    for m in range(1, 300):
        d, c = _lentz(m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), d, c)
        h *= d * c
        d, c = _lentz(-(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)), d, c)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution's CDF with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile: the t with ``t_cdf(t, df) == p`` (bisection, ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0 (got p={p!r}, df={df!r})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_and_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the t-based interval of the mean.

    half-width = t_{(1 + confidence) / 2, n - 1} * std / sqrt(n): with 5 seeds and 95 %,
    t = 2.776, wider than the normal 1.96 because the std itself is estimated from 5 runs.
    """
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        raise ValueError(f"an interval needs at least 2 values (got {len(values)})")
    std = float(values.std(ddof=1))
    t = t_quantile((1 + confidence) / 2, len(values) - 1)
    return float(values.mean()), std, t * std / math.sqrt(len(values))


def compare_seeds(
    first: Sequence[float],
    second: Sequence[float],
    names: tuple[str, str],
    confidence: float = 0.95,
) -> str:
    """Which of two sets of per-seed results is ahead: "<name> ahead" or "intervals overlap".

    One side is ahead only when its whole t-interval of the mean (:func:`mean_and_interval`)
    lies above the other's; otherwise the seeds cannot tell the two apart.
    """
    (m1, _, h1), (m2, _, h2) = (mean_and_interval(v, confidence) for v in (first, second))
    if m1 - h1 > m2 + h2:
        return f"{names[0]} ahead"
    if m2 - h2 > m1 + h1:
        return f"{names[1]} ahead"
    return "intervals overlap"


def trainable_range(
    values: Sequence[float], accuracies: Sequence[float], threshold: float
) -> tuple[float, float] | None:
    """The smallest and largest value whose accuracy reaches ``threshold``; None if none does."""
    ok = [v for v, a in zip(values, accuracies, strict=True) if a >= threshold]
    return (min(ok), max(ok)) if ok else None


def decades(span: tuple[float, float] | None) -> float:
    """Width of a (low, high) range in powers of ten; 0 for None or a single value."""
    if span is None:
        return 0.0
    low, high = span
    return math.log10(high / low)


def per_epoch_table(runs: dict[str, Sequence[History]], key: str = "test_acc") -> str:
    """Mean +- std over seeds of ``key`` per epoch, one column per run name, as text."""
    names = list(runs)
    stats = {n: mean_std(runs[n], key) for n in names}
    lines = ["epoch  " + "  ".join(f"{n:>16}" for n in names)]
    for e in range(len(stats[names[0]][0])):
        row = "  ".join(f"{stats[n][0][e]:.3f} ± {stats[n][1][e]:.3f}".rjust(16) for n in names)
        lines.append(f"{e + 1:5}  {row}")
    return "\n".join(lines)
