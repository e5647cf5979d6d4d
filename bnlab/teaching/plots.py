"""Small matplotlib helpers for the notebooks: one picture per function.

Every function draws on the ``ax`` (or axes) it is given, or makes a new figure, and
returns what it drew on, so a notebook can assert on the data and add to the plot.

Serves notebooks 01, 03, 05, 06 and 08.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor


def fmt(value: float | None) -> str:
    """A number as a title or label shows it: 3 significant digits, no float noise.

    Sliders produce values such as 0.01 + 9 * 0.01 = 0.09999999999999999; printed raw,
    that noise lands in the figure. ``fmt`` gives '0.1', '1e-05', '16', and 'None'.
    """
    return "None" if value is None else f"{value:.3g}"


def activation_histograms(
    activations: dict[str, Tensor],
    axes: Sequence[plt.Axes] | None = None,
    title: str = "",
    bins: int = 40,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
) -> Sequence[plt.Axes]:
    """One histogram per layer, side by side (the picture of Glorot & Bengio 2010, Fig. 3).

    ``activations`` maps a layer name to its outputs; each panel shows their distribution
    and its standard deviation.
    """
    if axes is None:
        # constrained layout makes room for the suptitle above the panels' own titles
        _, axes = plt.subplots(
            1,
            len(activations),
            figsize=(2.2 * len(activations), 2.4),
            sharey=True,
            layout="constrained",
        )
        axes = np.atleast_1d(axes)
    for i, (ax, a) in enumerate(zip(axes, activations.values(), strict=True)):
        values = a.detach().flatten().cpu().numpy()
        ax.hist(values, bins=bins, range=value_range, color=f"C{i % 10}", density=True)
        ax.set_title(f"layer {i + 1}\nstd {values.std():.3f}", fontsize=9)
        ax.set_yticks([])
        ax.locator_params(axis="x", nbins=3)  # -1, 0, 1: neighbours' labels stay apart
    if title:
        axes[0].figure.suptitle(title)
    return axes


def curves(
    series: dict[str, Sequence[float]],
    ax: plt.Axes | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
    target: float | None = None,
) -> plt.Axes:
    """Several named curves on one axis (loss, accuracy, running statistics ...).

    ``target`` draws a dashed horizontal line, e.g. the population value a running
    statistic should approach.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), np.asarray(values, dtype=float), label=name)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return ax


def running_stats(traj, ax: Sequence[plt.Axes] | None = None) -> Sequence[plt.Axes]:
    """Running mean and variance per step against the population values.

    ``traj`` is a :class:`bnlab.teaching.widgets.Trajectory`; two panels (mean, variance).
    """
    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(9, 3))
    curves(
        {"batch mean": traj.batch_mean, "running mean": traj.running_mean},
        ax[0],
        ylabel="mean",
        target=traj.population_mean,
    )
    curves(
        {"batch var": traj.batch_var, "running var": traj.running_var},
        ax[1],
        ylabel="variance",
        target=traj.population_std**2,
    )
    ax[0].set_title(f"momentum={fmt(traj.momentum)}, batch size={traj.batch_size}", fontsize=9)
    return ax


def eps_curve(effect, ax: plt.Axes | None = None) -> plt.Axes:
    """Output std of a low-variance channel against eps (log x), current eps marked.

    ``effect`` is a :class:`bnlab.teaching.widgets.EpsEffect`.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.semilogx(effect.eps_grid, effect.std_grid, label="std of BN output")
    ax.axvline(effect.channel_std**2, color="gray", ls=":", label="channel variance")
    ax.plot([effect.eps], [effect.output_std], "o", color="C3", label=f"eps={fmt(effect.eps)}")
    ax.set_xlabel("eps")
    ax.set_ylabel("output std")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"channel std {fmt(effect.channel_std)}", fontsize=9)
    ax.legend(fontsize=8)
    return ax


def accuracy_runs(
    runs: dict, title: str = "", ax: plt.Axes | None = None, chance: float = 0.1
) -> plt.Axes:
    """Mean test accuracy per epoch of each named group of runs, with a +-1 std band.

    ``runs`` maps a name to a list of ``bnlab.train.History`` (one per seed); the legend
    gives the number of runs. A dotted line marks chance accuracy (``chance``).
    """
    from bnlab.experiments.sweeps import mean_std

    ax = ax or plt.gca()
    for name, histories in runs.items():
        mean, std = mean_std(histories, "test_acc")
        epochs = np.arange(1, len(mean) + 1)
        ax.plot(epochs, mean, marker="o", label=f"{name} (n={len(histories)})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.25)
    ax.set(xlabel="epoch", ylabel="test accuracy", title=title, ylim=(0, 1))
    ax.axhline(chance, color="gray", ls=":", lw=1, label="chance")
    ax.legend()
    return ax


def validation_curves(
    runs: dict,
    threshold: float | None = None,
    ax: plt.Axes | None = None,
    title: str = "",
    chance: float = 0.1,
) -> plt.Axes:
    """Validation accuracy against optimizer steps: each seed thin, the mean of each arm bold.

    ``runs`` maps an arm's name to a list of ``bnlab.train.History`` measured with
    ``fit(eval_every=k)`` (one per seed); runs stopped early at a threshold end there.
    ``threshold`` draws the line that steps-to-threshold counts to.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.4))
    for i, (name, histories) in enumerate(runs.items()):
        for h in histories:
            ax.plot(h.curve_steps, h.curve_val, color=f"C{i}", lw=0.8, alpha=0.45)
        length = min(len(h.curve_val) for h in histories)
        if length:
            mean = np.mean([h.curve_val[:length] for h in histories], axis=0)
            steps = histories[0].curve_steps[:length]
            ax.plot(steps, mean, color=f"C{i}", lw=2, label=f"{name} (n={len(histories)})")
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.axhline(chance, color="gray", ls=":", lw=1, label="chance")
    ax.set(xlabel="SGD step", ylabel="validation accuracy", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    return ax
