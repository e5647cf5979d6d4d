"""Small matplotlib helpers for the notebooks: one picture per function.

Every function draws on the ``ax`` (or axes) it is given, or makes a new figure, and
returns what it drew on, so a notebook can assert on the data and add to the plot.

Serves notebooks 01, 02, 03, 04, 05, 06, 07, 08 and 09.
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


def reduction_axes(
    shape: Sequence[int] = (4, 6, 2, 2),
    index: Sequence[int] = (1, 2, 0, 1),
    groups: int = 2,
    axes: Sequence[plt.Axes] | None = None,
) -> tuple[Sequence[plt.Axes], dict[str, Tensor]]:
    """Which elements share one element's mean and variance in BatchNorm, LayerNorm,
    InstanceNorm and GroupNorm (the picture of Wu & He 2018, Fig. 2), measured.

    Each panel is an (N, C, H, W) input laid out as rows = samples and columns = channels,
    each channel's H * W positions side by side. The outlined element is perturbed; every
    output that changes is coloured: those are the elements whose statistics include it
    (``bnlab.nn.norms.shared_statistics``). Returns (axes, masks), masks mapping each
    norm's name to its bool mask of ``shape``.
    """
    from bnlab.nn import norms

    n, c = shape[0], shape[1]
    positions = int(np.prod(shape[2:]))
    kinds = {
        "BatchNorm": (norms.batch_norm_train, "over N, H, W"),
        "LayerNorm": (lambda x: norms.layer_norm(x, x.shape[1:]), "over C, H, W"),
        "InstanceNorm": (norms.instance_norm, "over H, W"),
        f"GroupNorm (G={groups})": (
            lambda x: norms.group_norm(x, groups),
            f"over H, W, {c // groups} channels",
        ),
    }
    masks = {name: norms.shared_statistics(fn, shape, index) for name, (fn, _) in kinds.items()}
    if axes is None:
        _, axes = plt.subplots(1, len(kinds), figsize=(13, 2.9), layout="constrained")
    column = index[1] * positions + int(np.ravel_multi_index(tuple(index[2:]), tuple(shape[2:])))
    for ax, (name, (_, over)) in zip(axes, kinds.items(), strict=True):
        image = masks[name].reshape(n, c * positions).double().numpy()
        ax.imshow(image, cmap="Blues", vmin=-0.15, vmax=1.2, aspect="auto")
        ax.set_xticks(np.arange(-0.5, c * positions, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="minor", length=0)
        for channel in range(1, c):  # channel boundaries; group boundaries thicker
            thick = name.startswith("GroupNorm") and channel % (c // groups) == 0
            ax.axvline(
                channel * positions - 0.5, color="k" if thick else "gray", lw=2 if thick else 0.8
            )
        ax.add_patch(
            plt.Rectangle((column - 0.5, index[0] - 0.5), 1, 1, fill=False, ec="red", lw=2.5)
        )
        ax.set_xticks([positions * k + (positions - 1) / 2 for k in range(c)], range(c))
        ax.set_yticks(range(n))
        ax.set(xlabel=f"channel ({positions} positions each)", ylabel="sample")
        ax.set_title(
            f"{name}: {over}\n{int(masks[name].sum())} elements share the red one's μ, σ²",
            fontsize=9,
        )
    return axes, masks


_SYMPTOM_COLOURS = {"✗": "tab:red", "✓": "tab:green"}


def _symptom_bars(ax: plt.Axes, bars: dict) -> None:
    labels = list(bars)
    values = [bars[k] for k in labels]
    colours = [_SYMPTOM_COLOURS.get(k[:1], "gray") for k in labels]
    ax.bar(range(len(labels)), values, color=colours)
    ax.set_xticks(range(len(labels)), [k.lstrip("✗✓ ") for k in labels], fontsize=7)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)


def _symptom_lines(ax: plt.Axes, lines: dict, logx: bool) -> None:
    for name, (x, y) in lines.items():
        ax.plot(x, y, "o-", color=_SYMPTOM_COLOURS.get(name[:1]), label=name.lstrip("✗✓ "), ms=4)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])


def pitfall_symptoms(panels: Sequence[dict], ncols: int = 4, axes=None):
    """Small multiples: one measured symptom per panel, broken vs fixed (notebook 06).

    Each panel is a dict with ``title``, ``ylabel`` and either ``bars`` (label -> value;
    labels starting with "✗" are drawn red, "✓" green, others gray) or ``lines`` (series
    name -> (x, y), with ``logx`` for a log2 x axis); ``logy`` for a log y axis; ``ref`` (a
    value) draws a dotted line.
    Returns the axes.
    """
    rows = -(-len(panels) // ncols)
    if axes is None:
        _, axes = plt.subplots(rows, ncols, figsize=(3.3 * ncols, 2.7 * rows), layout="constrained")
    flat = np.ravel(axes)
    for ax, panel in zip(flat, panels, strict=False):
        if "bars" in panel:
            _symptom_bars(ax, panel["bars"])
        else:
            _symptom_lines(ax, panel["lines"], panel.get("logx", False))
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("ref") is not None:
            ax.axhline(panel["ref"], color="k", ls=":", lw=1)
        if "lines" in panel:
            ax.legend(fontsize=7)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.15)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    return axes


def bn_backward_graph(ax: plt.Axes | None = None, terms: bool = False) -> plt.Axes:
    """BN's forward graph for one channel (grey) and the backward's three paths (dashed).

    The gradient reaches x_i from x_hat directly, through the mean mu, and through the
    variance sigma^2; each path gives one term of dx = gamma / sqrt(var + eps) * (...).
    ``terms=True`` names each path's term in the legend (notebook 02's compact formula);
    the default names only the paths, so the figure can stand before the exercise.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.6))
    nodes = {
        "x": (0.0, 0.0, r"$x_i$"),
        "mu": (2.0, 1.5, r"$\mu$"),
        "xmu": (4.0, 0.0, r"$x_i-\mu$"),
        "var": (6.0, 1.5, r"$\sigma^2$"),
        "xhat": (8.0, 0.0, r"$\hat x_i$"),
        "y": (10.0, 0.0, r"$y_i$"),
    }
    box = dict(boxstyle="round,pad=0.35", fc="white", ec="0.3")
    for x, y, label in nodes.values():
        ax.text(x, y, label, ha="center", va="center", fontsize=13, zorder=3, bbox=box)

    def arrow(a: str, b: str, color: str = "0.55", rad: float = 0.0, dashed: bool = False):
        (x0, y0, _), (x1, y1, _) = nodes[a], nodes[b]
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color=color,
                lw=2.0 if dashed else 1.2, ls="--" if dashed else "-", shrinkA=19, shrinkB=19,
                connectionstyle=f"arc3,rad={rad}", zorder=2,
            )
        )  # fmt: skip

    forward = [("x", "mu"), ("x", "xmu"), ("mu", "xmu"), ("xmu", "var"), ("var", "xhat")]
    for a, b in [*forward, ("xmu", "xhat"), ("xhat", "y")]:
        arrow(a, b)
    for x, y, label in [
        (1.0, 1.0, "mean"),
        (3.0, 1.05, r"$-\mu$"),
        (5.25, 0.42, r"mean of $(\cdot)^2$"),
        (6.75, 0.42, r"$\div\sqrt{\sigma^2+\epsilon}$"),
        (9.0, 0.25, r"$\gamma\,\hat x_i+\beta$"),
    ]:
        ax.text(x, y, label, ha="center", fontsize=9, color="0.4")
    paths = {
        "direct": ("C0", [("xhat", "xmu", -0.25), ("xmu", "x", -0.25)], r"$dy_i$"),
        r"through $\mu$": (
            "C1",
            [("xhat", "xmu", -0.45), ("xmu", "mu", -0.35), ("mu", "x", -0.35)],
            r"$-\overline{dy}$",
        ),
        r"through $\sigma^2$": (
            "C2",
            [("xhat", "var", 0.35), ("var", "xmu", 0.35), ("xmu", "x", -0.6)],
            r"$-\hat x_i\,\overline{dy\,\hat x}$",
        ),
    }
    handles = []
    for name, (color, edges, term) in paths.items():
        for a, b, rad in edges:
            arrow(a, b, color, rad, dashed=True)
        label = f"{name}: {term}" if terms else name
        handles.append(Line2D([], [], color=color, lw=2, ls="--", label=label))
    title = (
        r"$dx_i = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}\,(\ldots)$, one term per path"
        if terms
        else "the backward adds one term per path"
    )
    ax.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=9,
        frameon=False, title=title, title_fontsize=10,
    )  # fmt: skip
    ax.set(xlim=(-0.7, 10.7), ylim=(-1.1, 2.1))
    ax.axis("off")
    ax.set_title(r"forward (grey) and the backward's three paths from $\hat x$ to $x$ (dashed)")
    return ax


def speedup_bars(
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    title: str = "",
    ylabel: str = "speedup over the baseline (x)",
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Grouped bars of speedups (one group per label, one bar per series) over a line at 1x.

    ``series`` maps a name (a variant, a mode) to one ratio per label; None is a case not
    measured (no bar). Above the line the variant is faster than the baseline.
    Serves notebooks 04 (kernel vs torch) and 07 (folded vs unfused).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) + 2.5), 3), layout="constrained")
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ys = [float("nan") if v is None else v for v in values]
        ax.bar([j + i * width for j in range(len(labels))], ys, width=width, label=name)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def floor_bars(
    medians: dict[str, dict[str, float]],
    floors: dict[str, float],
    unblocked: dict[str, float],
    title: str = "",
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Each implementation's time against the read/write floor: floor / median per mode.

    medians: impl -> mode -> seconds (a mode an implementation lacks gets no bar); floors
    and unblocked: mode -> the floor in seconds with channel blocking and without. 1 is the
    floor reached; the dashed mark is where a kernel moving the unblocked traffic at full
    bandwidth would stand. Serves notebook 04.
    """
    modes = list(floors)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(modes) + 2.5), 3), layout="constrained")
    width = 0.8 / max(1, len(medians))
    for i, (impl, by_mode) in enumerate(medians.items()):
        ys = [floors[m] / by_mode[m] if m in by_mode else float("nan") for m in modes]
        ax.bar([j + i * width for j in range(len(modes))], ys, width=width, label=impl)
    ax.axhline(1, color="k", lw=0.8, label="the floor (blocked traffic)")
    for j, m in enumerate(modes):
        y = floors[m] / unblocked[m]
        ax.plot([j - width / 2, j + 0.8 - width / 2], [y, y], "k--", lw=0.8,
                label="unblocked traffic at full bandwidth" if j == 0 else None)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes, fontsize=8)
    ax.set_ylabel("floor time / measured time", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def _box(ax: plt.Axes, xy: tuple[float, float], text: str, face: str, **kw) -> None:
    ax.text(
        *xy,
        text,
        ha="center",
        va="center",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.4", "fc": face, "ec": "0.4", "lw": 0.8},
        **kw,
    )


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], **kw) -> None:
    style = {"arrowstyle": "->", "color": "0.3", "lw": 1.0, **kw}
    ax.annotate("", xy=end, xytext=start, arrowprops=style)


def sync_exchange(shards: Sequence[Tensor], axes: Sequence[plt.Axes] | None = None):
    """What SyncBatchNorm's ranks exchange, for one channel (notebook 09).

    ``shards`` holds each rank's values of the channel (1-D tensors, sizes may differ).
    Left: each rank's values with its own mean +- std, and the whole batch's (dashed): the
    statistics per-replica BN would use, against the global ones. Right: the exchange, each
    rank's (count, mean, M2) in all_gathers (a small header with the sizes, then the
    statistics), merged into the global mean and variance on
    every rank; the backward's one all_reduce of two sums. Returns the two axes.
    """
    if axes is None:
        _, axes = plt.subplots(
            1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.35]}, layout="constrained"
        )
    left, right = axes
    values = [np.asarray(s.detach().double().cpu()) for s in shards]
    everything = np.concatenate(values)
    g_mean, g_std = everything.mean(), everything.std()
    rows = len(values)
    for r, v in enumerate(values):
        y = rows - r
        left.plot(v, np.full_like(v, y), "o", color=f"C{r}", alpha=0.6, ms=5)
        left.errorbar(v.mean(), y - 0.28, xerr=v.std(), fmt="|", color=f"C{r}", ms=12, capsize=3)
    left.plot(everything, np.zeros_like(everything), "o", color="0.45", alpha=0.5, ms=5)
    left.errorbar(g_mean, -0.28, xerr=g_std, fmt="|", color="k", ms=12, capsize=3)
    left.axvline(g_mean, color="k", ls="--", lw=1)
    left.set_yticks(range(rows + 1), ["all ranks"] + [f"rank {r}" for r in reversed(range(rows))])
    left.set_ylim(-0.8, rows + 0.5)
    left.set_xlabel("value of one channel (bar: mean ± std)")
    left.set_title("each rank's statistics vs the whole batch's (dashed)", fontsize=9)

    right.set_axis_off()
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    ys = np.linspace(0.86, 0.42, rows)
    for r, (v, y) in enumerate(zip(values, ys, strict=True)):
        m2 = ((v - v.mean()) ** 2).sum()
        text = f"rank {r}: n={v.size}\nmean={v.mean():.2f}, M2={m2:.2f}"
        _box(right, (0.14, y), text, "white", color=f"C{r}")
        _arrow(right, (0.29, y), (0.43, 0.64))
    _box(right, (0.53, 0.64), "all_gather\n[n, mean, M2]\n1 + 2C values\nper rank", "#e8f0fb")
    _arrow(right, (0.63, 0.64), (0.7, 0.64))
    merged = f"every rank merges\n(Chan, in rank order):\nN={everything.size}\nmean={g_mean:.2f}, "
    _box(right, (0.85, 0.64), merged + f"var={everything.var():.2f}", "#eaf6ec")
    right.text(0.85, 0.4, "= BN over the\nconcatenated batch", ha="center", fontsize=8)
    back = "backward: each rank's Σdy and Σdy·x̂ (2C values) → one all_reduce (sum) → global means"
    _box(right, (0.5, 0.1), back, "#fbf3e4")
    right.set_title("forward: all_gathers of the statistics, not of the data", fontsize=9)
    return axes
