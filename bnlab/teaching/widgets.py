"""The notebook-03 dashboard: eps, momentum and batch size as sliders.

The computation lives in two plain functions that tests call directly:

- :func:`running_stat_trajectory` feeds batches from a known population to the real
  :class:`bnlab.nn.modules.BatchNorm1d` and records its running statistics per step;
- :func:`eps_effect` normalizes a low-variance channel with the real
  :func:`bnlab.nn.functional.batch_norm` for a range of eps.

:func:`dashboard` only wires ipywidgets sliders to them and draws the result; its
``result`` attribute holds what it last computed, so code can set a slider and
assert what changed (widget outputs are never compared by nbval).

Serves notebook 03.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab.nn import functional as F
from bnlab.nn import modules


@dataclass
class Trajectory:
    """Running statistics of a BatchNorm1d(1) per training step; arrays of shape (steps,)."""

    momentum: float | None
    batch_size: int
    population_mean: float
    population_std: float
    batch_mean: np.ndarray
    batch_var: np.ndarray  # unbiased, the value the running variance averages
    running_mean: np.ndarray
    running_var: np.ndarray


@torch.no_grad()
def running_stat_trajectory(
    momentum: float | None = 0.1,
    batch_size: int = 32,
    steps: int = 100,
    population_mean: float = 2.0,
    population_std: float = 3.0,
    seed: int = 0,
) -> Trajectory:
    """Train-mode steps of BatchNorm1d(1) on batches (batch_size, 1) from N(mean, std^2).

    ``momentum`` is PyTorch's (weight of the new batch); None is the cumulative
    average 1/num_batches_tracked. Running statistics start at mean 0, var 1, as in torch.
    """
    F.validate_momentum(momentum)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (got {batch_size!r}): BN needs 2 values")
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps!r})")
    g = torch.Generator().manual_seed(seed)
    bn = modules.BatchNorm1d(1, momentum=momentum, dtype=torch.float64)
    out = {k: np.empty(steps) for k in ("batch_mean", "batch_var", "running_mean", "running_var")}
    for t in range(steps):
        x = population_mean + population_std * torch.randn(
            batch_size, 1, generator=g, dtype=torch.float64
        )
        bn(x)
        out["batch_mean"][t] = x.mean().item()
        out["batch_var"][t] = x.var().item()
        out["running_mean"][t] = bn.running_mean.item()
        out["running_var"][t] = bn.running_var.item()
    return Trajectory(momentum, batch_size, population_mean, population_std, **out)


@dataclass
class EpsEffect:
    """BN output of one channel of std ``channel_std`` (no affine) for a given eps."""

    eps: float
    channel_std: float
    x: np.ndarray  # (n,) the channel's values
    y: np.ndarray  # (n,) BN output for ``eps``
    output_std: float  # measured std of y; 1 when eps << var, shrinks when eps >~ var
    predicted_std: float  # channel_std / sqrt(channel_std^2 + eps)
    eps_grid: np.ndarray  # (k,) eps values on a log grid
    std_grid: np.ndarray  # (k,) measured output std for each of them


def eps_effect(
    eps: float = 1e-5, channel_std: float = 1e-3, n: int = 256, seed: int = 0, grid: int = 49
) -> EpsEffect:
    """Normalize a channel of ``n`` values with std ``channel_std`` and the given eps.

    The output's std is channel_std / sqrt(channel_std^2 + eps) (biased std): about 1
    while eps << channel_std^2, damped once eps approaches the channel's variance.
    """
    F.validate_eps(eps)
    if not channel_std > 0:
        raise ValueError(f"channel_std must be positive (got {channel_std!r})")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = (z - z.mean()) / z.std(unbiased=False) * channel_std  # exactly this (biased) std

    def output(e: float) -> torch.Tensor:
        return F.batch_norm(x, None, None, training=True, eps=e)

    y = output(eps)
    eps_grid = np.logspace(-10, 0, grid)
    std_grid = np.array([output(float(e)).std(unbiased=False).item() for e in eps_grid])
    return EpsEffect(
        eps=float(eps),
        channel_std=float(channel_std),
        x=x.flatten().numpy(),
        y=y.flatten().numpy(),
        output_std=y.std(unbiased=False).item(),
        predicted_std=channel_std / float(np.sqrt(channel_std**2 + eps)),
        eps_grid=eps_grid,
        std_grid=std_grid,
    )


@dataclass
class DashboardResult:
    """What the dashboard computed last."""

    trajectory: Trajectory
    eps: EpsEffect


class Dashboard:
    """Sliders ``eps``, ``momentum``, ``batch_size``, checkbox ``cumulative``; ``title``
    states the values plotted, ``output`` shows the figure; ``result`` holds the last
    :class:`DashboardResult`; ``updates`` counts recomputations. Display it with
    ``display(dash)`` or as a cell's last value.

    Its display carries, besides the live widget, a PNG of the figure it showed when it was
    displayed: readers without a kernel or widget support (GitHub, nbviewer, an untrusted
    notebook) see that picture instead of a widget's text form.
    """

    def __init__(self, steps: int = 60, channel_std: float = 1e-3, seed: int = 0, plot=True):
        import ipywidgets as w

        self.steps, self.channel_std, self.seed, self.plot = steps, channel_std, seed, plot
        # One label column and one track length for all sliders: with the default width a
        # long label leaves "momentum (PyTorch)" a 65-pixel track for its 99 steps.
        sized = {"style": {"description_width": "140px"}, "layout": {"width": "440px"}}
        self.eps = w.FloatLogSlider(
            1e-5, base=10, min=-10, max=0, step=0.25, description="eps", **sized
        )
        self.momentum = w.FloatSlider(
            0.1, min=0.01, max=1.0, step=0.01, description="momentum (PyTorch)", **sized
        )
        self.batch_size = w.IntSlider(16, min=2, max=256, step=1, description="batch size", **sized)
        # indent=False: the label goes right of the box at its full width (an indented
        # checkbox reserves the description column and clips longer labels).
        self.cumulative = w.Checkbox(False, description="momentum=None (cumulative)", indent=False)
        self.title = w.HTML()
        self.output = w.Output()
        self.widget = w.VBox(
            [
                w.HBox([self.eps, self.batch_size]),
                w.HBox([self.momentum, self.cumulative]),
                self.title,
                self.output,
            ]
        )
        # CSS classes name the parts for browser tests (tests/browser) and custom styles.
        for part, name in [
            (self.widget, "dashboard"),
            (self.eps, "eps"),
            (self.momentum, "momentum"),
            (self.batch_size, "batch-size"),
            (self.cumulative, "cumulative"),
            (self.title, "title"),
            (self.output, "output"),
        ]:
            part.add_class(f"bnlab-{name}")
        self.png: str | None = None  # the last figure, base64 PNG
        self.updates = 0
        self.result: DashboardResult | None = None
        for slider in (self.eps, self.momentum, self.cumulative, self.batch_size):
            slider.observe(self._update, names="value")
        self._update()

    def compute(self) -> DashboardResult:
        """Recompute from the current slider values (no drawing)."""
        momentum = None if self.cumulative.value else float(self.momentum.value)
        traj = running_stat_trajectory(
            momentum, int(self.batch_size.value), self.steps, seed=self.seed
        )
        eff = eps_effect(float(self.eps.value), self.channel_std, seed=self.seed)
        return DashboardResult(traj, eff)

    def caption(self) -> str:
        """The values the current figure shows, formatted as its titles print them."""
        from bnlab.teaching.plots import fmt

        traj = self.result.trajectory
        return (
            f"eps={fmt(self.result.eps.eps)} · momentum={fmt(traj.momentum)} · "
            f"batch size={traj.batch_size}"
        )

    def _update(self, _change=None) -> None:
        self.result = self.compute()
        self.updates += 1
        self.title.value = f"<b>{self.caption()}</b>"
        if self.plot:
            self._draw()

    def _draw(self) -> None:
        import base64
        import io

        import matplotlib.pyplot as plt

        from bnlab.teaching import plots

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        plots.running_stats(self.result.trajectory, axes[:2])
        plots.eps_curve(self.result.eps, axes[2])
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)  # shown in the Output only, not again below the cell
        # Set the Output's content directly: works with and without a running kernel.
        self.png = base64.b64encode(buf.getvalue()).decode("ascii")
        self.output.outputs = (
            {
                "output_type": "display_data",
                "data": {"image/png": self.png, "text/plain": "<dashboard figure>"},
                "metadata": {},
            },
        )

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (
            f"<eps/momentum dashboard: {self.caption()}; run the notebook to use it>"
        )
        if self.png is not None:  # the static figure for readers without widgets
            bundle["image/png"] = self.png
        return bundle


def dashboard(steps: int = 60, channel_std: float = 1e-3, seed: int = 0, plot: bool = True):
    """Build the eps / momentum / batch-size dashboard and compute its first result."""
    return Dashboard(steps=steps, channel_std=channel_std, seed=seed, plot=plot)
