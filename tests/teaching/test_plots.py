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


def test_reduction_axes_colours_the_elements_that_share_statistics():
    import matplotlib.pyplot as plt

    from bnlab.teaching import plots as teaching_plots

    axes, masks = teaching_plots.reduction_axes(shape=(4, 6, 2, 2), groups=2)
    counts = {name.split(" ")[0]: int(mask.sum()) for name, mask in masks.items()}
    # BN: N*H*W = 16; LN: C*H*W = 24; IN: H*W = 4; GN: (C/G)*H*W = 12
    assert counts == {"BatchNorm": 16, "LayerNorm": 24, "InstanceNorm": 4, "GroupNorm": 12}
    assert len(axes) == 4 and all(ax.get_title() for ax in axes)
    plt.close("all")


def test_the_new_figures_draw_what_they_are_given():
    import matplotlib.pyplot as plt
    import torch

    from bnlab.teaching import plots as teaching_plots

    ax = teaching_plots.speedup_bars(["a", "b"], {"fwd": [1.5, None], "bwd": [0.8, 2.0]})
    heights = [p.get_height() for p in ax.patches]
    drawn = sorted(round(h, 2) for h in heights if h == h)
    assert drawn == [0.8, 1.5, 2.0] and len(heights) - len(drawn) == 1  # None: an empty bar

    axes = teaching_plots.pitfall_symptoms(
        [
            {"title": "eval()", "ylabel": "acc", "bars": {"✗ train": 0.3, "✓ eval": 0.9}},
            {"title": "momentum", "ylabel": "err", "lines": {"torch": ([1, 2], [0.5, 0.2])}},
        ],
        ncols=2,
    )
    titles = [a.get_title() for a in axes if a.get_title()]
    assert titles == ["eval()", "momentum"]
    bar_colours = [p.get_facecolor()[:3] for p in axes[0].patches]
    assert bar_colours[0] != bar_colours[1]  # broken red, fixed green

    ax = teaching_plots.bn_backward_graph()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 3
    assert not any("overline" in t for t in legend)  # the terms are hidden by default
    with_terms = teaching_plots.bn_backward_graph(terms=True)
    assert any("overline" in t.get_text() for t in with_terms.get_legend().get_texts())

    shards = [torch.randn(3), torch.randn(5) + 1, torch.randn(8) - 1]
    left, right = teaching_plots.sync_exchange(shards)
    assert len(left.get_yticklabels()) >= 4 and right.get_title()
    plt.close("all")
