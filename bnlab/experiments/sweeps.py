"""Repeated training runs: over seeds, learning rates or init scales, with summaries.

Every run builds a fresh model after seeding (so seed s always means the same initial
weights and the same batch order), trains it with ``bnlab.train.fit`` and keeps its
``History``. Summaries turn a list of histories into mean and standard deviation per
epoch, and a sweep into the range of values in which training works.

Serves notebooks 05 and 08.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
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


FINAL = {"val_acc": "final_val_acc", "test_acc": "final_test_acc"}


def final_accuracy(
    results: dict[float, list[History]], key: str = "val_acc"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the final accuracy, one entry per swept value.

    key: "val_acc" (the default: sweeps choose, so they read the validation set) or
    "test_acc" (a sweep reported as such, with its test set read once per run).
    """
    if key not in FINAL:
        raise ValueError(f"key must be one of {sorted(FINAL)} (got {key!r})")
    finals = [[getattr(h, FINAL[key]) for h in hs] for hs in results.values()]
    stats_ = [_mean_std(np.array(f)) for f in finals]
    return np.array([m for m, _ in stats_]), np.array([s for _, s in stats_])


def best_value(results: dict[float, list[History]]) -> tuple[float, float]:
    """The swept value with the highest mean final *validation* accuracy, and that accuracy.

    Ties go to the first value in sweep order. A fair comparison picks each model's best
    learning rate (or init) from the same grid this way, on held-out data, with selection
    seeds apart from the seeds it then reports; it never looks at the test set.
    """
    accuracies, _ = final_accuracy(results, "val_acc")
    index = int(np.argmax(accuracies))
    return list(results)[index], float(accuracies[index])


def mean_and_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the t-based interval of the mean.

    half-width = t_{(1 + confidence) / 2, n - 1} * std / sqrt(n) (``scipy.stats.t.ppf``): with
    5 seeds and 95 %, t = 2.776, wider than the normal 1.96 because the std itself is
    estimated from 5 runs.
    """
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        raise ValueError(f"an interval needs at least 2 values (got {len(values)})")
    std = float(values.std(ddof=1))
    t = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1))
    return float(values.mean()), std, t * std / math.sqrt(len(values))


def _number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, never ``-0.000``."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


@dataclass(frozen=True)
class Comparison:
    """Two arms compared by the interval of their difference (:func:`compare`).

    difference: mean of the first arm minus mean of the second; low, high: its interval at
    ``confidence``; p_value: two-sided, for "no difference in means"; test: "Welch t" or
    "paired t"; verdict: "<first> ahead", "<second> ahead" or "not resolved"; n: the number
    of values per arm.
    """

    names: tuple[str, str]
    difference: float
    low: float
    high: float
    p_value: float
    test: str
    verdict: str
    n: tuple[int, int]
    confidence: float = 0.95
    digits: int = 3  # decimals when printed: 3 for accuracies, 0 for step counts

    @property
    def half_width(self) -> float:
        """Half the width of the interval: the smallest difference this design resolves."""
        return (self.high - self.low) / 2

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (one arm is ahead at this confidence)."""
        return self.verdict != "not resolved"

    def interval(self, digits: int | None = None) -> str:
        """``"0.138 [0.068, 0.208]"``: the difference and its interval."""
        digits = self.digits if digits is None else digits
        d, lo, hi = (_number(v, digits) for v in (self.difference, self.low, self.high))
        return f"{d} [{lo}, {hi}]"

    def sentence(self, digits: int | None = None) -> str:
        """The verdict as the course states it, e.g. ``"BN ahead by 0.138 [0.068, 0.208]"``.

        A resolved difference reads "<arm> ahead by d [lo, hi]" with d > 0 (the interval of
        the leading arm's advantage); an unresolved one reads "not resolved with n seeds:
        this design resolves only differences larger than h", h the interval's half-width.
        """
        digits = self.digits if digits is None else digits
        seeds = (
            f"{self.n[0]} seeds" if self.n[0] == self.n[1] else f"{self.n[0]} + {self.n[1]} seeds"
        )
        if math.isinf(self.half_width):
            return (
                f"not resolved with {seeds}: every run gave the same value (difference "
                f"{_number(self.difference, digits)}), so the runs cannot estimate its spread"
            )
        if not self.resolved:
            h = _number(self.half_width, digits)
            return (
                f"not resolved with {seeds} ({self.test}, difference {self.interval(digits)}): "
                f"this design resolves only differences larger than {h}"
            )
        sign = 1 if self.difference > 0 else -1
        lo, hi = sorted((sign * self.low, sign * self.high))
        d, lo, hi = (_number(v, digits) for v in (sign * self.difference, lo, hi))
        return f"{self.verdict} by {d} [{lo}, {hi}] ({self.test}, {seeds}, p = {self.p_value:.2g})"

    def __str__(self) -> str:
        return self.sentence()


def compare(
    first: Sequence[float],
    second: Sequence[float],
    names: tuple[str, str],
    *,
    paired: bool = False,
    confidence: float = 0.95,
    lower_is_better: bool = False,
    word: str = "ahead",
    digits: int = 3,
) -> Comparison:
    """Compare two arms by the t-interval of the difference of their means.

    first, second: one value per run (e.g. final test accuracy per seed). Welch's t
    (``scipy.stats.ttest_ind(equal_var=False)``) by default; ``paired=True`` when both arms
    ran the same seeds in the same order, so that run i of each shares its seed (the same
    initial data order): then the interval is that of the mean per-seed difference
    (``scipy.stats.ttest_rel``). The verdict names the arm ahead when the interval excludes
    0, else "not resolved"; overlapping intervals of the two *means* are not the test.
    lower_is_better: the arm with the lower mean is the one ahead (e.g. steps to a
    threshold). word: what the verdict calls the arm with the larger value when "ahead" is
    not meant, e.g. ``word="higher"`` for a measured shift. digits: decimals when printed.
    Every value must be finite: a run that never reached a threshold has no step count to
    average (:func:`compare_steps`).
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"compare needs at least 2 values per arm (got {len(a)} and {len(b)}): run more seeds"
        )
    if paired and len(a) != len(b):
        raise ValueError(
            f"paired=True needs the same seeds in both arms (got {len(a)} and {len(b)} values); "
            "pass paired=False for Welch's test"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(
            "compare needs finite values (got inf or nan: a run that never reached its "
            "threshold within the cap); report how many runs reached it instead"
        )
    test = "paired t" if paired else "Welch t"
    difference = float(a.mean() - b.mean())
    spread = np.ptp(a - b) if paired else max(np.ptp(a), np.ptp(b))
    scale = max(1.0, float(np.abs(np.concatenate([a, b])).max()))
    if spread <= 1e-9 * scale:
        # no variation (up to rounding: accuracies on one test set can tie): the t interval
        # is undefined (scipy gives nan), so nothing is resolved
        low, high, p_value = -math.inf, math.inf, 1.0
    else:
        with warnings.catch_warnings():  # near-constant arms: scipy's precision warning
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
        low, high = (float(v) for v in result.confidence_interval(confidence))
        p_value = float(result.pvalue)
    first_ahead, second_ahead = (high < 0, low > 0) if lower_is_better else (low > 0, high < 0)
    if first_ahead:
        verdict = f"{names[0]} {word}"
    elif second_ahead:
        verdict = f"{names[1]} {word}"
    else:
        verdict = "not resolved"
    return Comparison(
        names=tuple(names), difference=difference, low=low, high=high, p_value=p_value,
        test=test, verdict=verdict, n=(len(a), len(b)), confidence=confidence, digits=digits,
    )  # fmt: skip


@dataclass(frozen=True)
class CensoredComparison:
    """Steps to a threshold compared by ranks: some runs never reached it within the cap,
    or the counts have no spread to estimate (every seed the same on the evaluation grid).

    A run that never got there has no step count, only "more than the cap": it ranks above
    every count (Mann-Whitney U). verdict: "<arm> ahead" (the arm that gets there in fewer
    steps) or "not resolved"; ``medians`` gives each arm's median count (inf: never).
    """

    names: tuple[str, str]
    reached: tuple[int, int]
    n: tuple[int, int]
    cap: int
    p_value: float
    verdict: str
    medians: tuple[float, float] = (math.nan, math.nan)

    @property
    def resolved(self) -> bool:
        return self.verdict != "not resolved"

    def sentence(self) -> str:
        counts = (
            f"median {self.medians[0]:g} vs {self.medians[1]:g} steps; {self.reached[0]} of "
            f"{self.n[0]} {self.names[0]} runs and {self.reached[1]} of {self.n[1]} "
            f"{self.names[1]} runs reached it within {self.cap} steps"
        )
        p = f"Mann-Whitney U, p = {self.p_value:.2g}"
        if not self.resolved:
            return f"not resolved ({counts}; {p})"
        return f"{self.verdict} ({counts}; {p})"

    def __str__(self) -> str:
        return self.sentence()


def compare_steps(
    first: Sequence[float],
    second: Sequence[float],
    names: tuple[str, str],
    cap: int,
    *,
    paired: bool = True,
    confidence: float = 0.95,
) -> Comparison | CensoredComparison:
    """Compare steps to a threshold (``History.steps_to``: inf for a run that never got there).

    When every run reached the threshold and the step counts vary, :func:`compare` (paired
    by seed by default, the arm with fewer steps ahead). Otherwise ranks: a run that never
    got there counts as slower than every run that did, and counts measured on the same
    evaluation grid may tie (:class:`CensoredComparison`, Mann-Whitney U).
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    finite = np.isfinite(a).all() and np.isfinite(b).all()
    spread = np.ptp(a - b) if finite and paired and len(a) == len(b) else None
    if finite and (spread is None or spread > 0):
        return compare(
            a, b, names, paired=paired, confidence=confidence, lower_is_better=True, digits=0
        )
    ranked_a, ranked_b = (np.where(np.isfinite(v), v, cap + 1.0) for v in (a, b))
    if len(set(ranked_a) | set(ranked_b)) == 1:  # every run the same: nothing to rank
        p_value = 1.0
    else:
        p_value = float(stats.mannwhitneyu(ranked_a, ranked_b, alternative="two-sided").pvalue)
    verdict = "not resolved"
    if p_value < 1 - confidence:
        faster = names[0] if np.median(ranked_a) < np.median(ranked_b) else names[1]
        verdict = f"{faster} ahead"
    return CensoredComparison(
        names=tuple(names),
        reached=(int(np.isfinite(a).sum()), int(np.isfinite(b).sum())),
        n=(len(a), len(b)),
        cap=cap,
        p_value=p_value,
        verdict=verdict,
        medians=(float(np.median(a)), float(np.median(b))),
    )


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
