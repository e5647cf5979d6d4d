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
