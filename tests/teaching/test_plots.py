"""bnlab.teaching.plots: each helper draws what it is given."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from bnlab.experiments import probes
from bnlab.teaching import plots

matplotlib.use("Agg")


def test_plot_helpers_draw_what_they_are_given():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    acts = probes.layer_activations(model, torch.randn(8, 4))
    assert list(acts) == ["1"] and acts["1"].shape == (8, 4)
    axes = plots.activation_histograms(acts)
    assert len(axes) == 1 and "std" in axes[0].get_title()
    with pytest.raises(ValueError, match="kind"):
        probes.layer_activations(model, torch.randn(8, 4), kind=torch.nn.Sigmoid)
    ax = plots.curves({"a": [1, 2, 3]}, target=2.0)
    assert len(ax.lines) == 2
    matplotlib.pyplot.close("all")


def test_accuracy_runs_draws_a_band_per_run_and_a_labelled_chance_line():
    from bnlab.experiments.train import History

    runs = {"plain": [History(test_acc=[0.1, 0.2]), History(test_acc=[0.2, 0.3])]}
    ax = plots.accuracy_runs(runs, "t")
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["plain (n=2)", "chance"] and ax.get_title() == "t"
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.15, 0.25])
    matplotlib.pyplot.close("all")
