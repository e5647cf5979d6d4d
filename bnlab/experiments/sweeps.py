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
        "lr",
        **fit_kwargs,
    )


def final_accuracy(results: dict[float, list[History]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of the final test accuracy, one entry per swept value."""
    stats = [_mean_std(np.array([h.final_test_acc for h in hs])) for hs in results.values()]
    return np.array([m for m, _ in stats]), np.array([s for _, s in stats])


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
