"""bnlab.teaching.widgets: the compute functions, and the dashboard's reaction to its sliders."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from bnlab.teaching import plots, widgets  # noqa: E402


def test_trajectory_approaches_population_values():
    t = widgets.running_stat_trajectory(0.1, 64, 200, population_mean=2.0, population_std=3.0)
    assert t.running_mean.shape == (200,)
    assert abs(t.running_mean[0] - 0.1 * t.batch_mean[0]) < 1e-12  # 0.9 * 0 + 0.1 * mean
    tail_mean, tail_var = t.running_mean[-50:].mean(), t.running_var[-50:].mean()
    assert abs(tail_mean - 2.0) < 0.3 and abs(tail_var - 9.0) < 1.5
    # the running average is smoother than the batch values it averages
    assert t.running_mean[-100:].std() < 0.5 * t.batch_mean[-100:].std()


def test_trajectory_matches_torch_batchnorm():
    t = widgets.running_stat_trajectory(0.3, 8, 5, seed=3)
    g = torch.Generator().manual_seed(3)
    bn = torch.nn.BatchNorm1d(1, momentum=0.3, dtype=torch.float64)
    for step in range(5):
        bn(2.0 + 3.0 * torch.randn(8, 1, generator=g, dtype=torch.float64))
        assert abs(bn.running_mean.item() - t.running_mean[step]) < 1e-12
        assert abs(bn.running_var.item() - t.running_var[step]) < 1e-12


def test_cumulative_average_and_momentum_one():
    t = widgets.running_stat_trajectory(None, 16, 30, seed=1)
    # momentum=None: the running mean is exactly the average of all batch means so far
    np.testing.assert_allclose(
        t.running_mean, np.cumsum(t.batch_mean) / np.arange(1, 31), atol=1e-12
    )
    t1 = widgets.running_stat_trajectory(1.0, 16, 5, seed=1)
    np.testing.assert_allclose(t1.running_mean, t1.batch_mean, atol=1e-12)  # last batch only
    np.testing.assert_allclose(t1.running_var, t1.batch_var, atol=1e-12)  # unbiased


def test_trajectory_rejects_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        widgets.running_stat_trajectory(0.99 + 1, 8, 5)
    with pytest.raises(ValueError, match="batch_size"):
        widgets.running_stat_trajectory(0.1, 1, 5)


def test_eps_effect_damps_a_low_variance_channel():
    small = widgets.eps_effect(1e-10, channel_std=1e-3)
    assert abs(small.output_std - 1.0) < 1e-3  # eps << var: unit output
    big = widgets.eps_effect(1e-2, channel_std=1e-3)  # eps = 10^4 * var
    assert abs(big.output_std - big.predicted_std) < 1e-9
    assert big.output_std < 0.011
    assert np.all(np.diff(big.std_grid) <= 1e-12)  # more eps, never more output std
    with pytest.raises(ValueError, match="eps"):
        widgets.eps_effect(0.0)


def test_dashboard_reacts_to_sliders():
    dash = widgets.dashboard(steps=20)
    first = dash.result
    assert dash.updates == 1 and first.trajectory.momentum == pytest.approx(0.1)
    dash.momentum.value = 0.5
    assert dash.updates == 2 and dash.result.trajectory.momentum == pytest.approx(0.5)
    # same batches (same seed), larger momentum: the first running mean is 5x larger
    assert dash.result.trajectory.running_mean[0] == pytest.approx(
        5 * first.trajectory.running_mean[0]
    )
    dash.batch_size.value = 128
    assert dash.result.trajectory.batch_size == 128
    dash.eps.value = 1e-2
    assert dash.result.eps.eps == pytest.approx(1e-2) and dash.result.eps.output_std < 0.02
    dash.cumulative.value = True
    assert dash.result.trajectory.momentum is None
    assert len(dash.output.outputs) == 1  # one figure, replaced at each update


def test_titles_show_the_slider_value_not_float_noise():
    """The front end computes momentum 0.01 + 9 * 0.01 = 0.09999999999999999; titles say 0.1."""
    dash = widgets.dashboard(steps=10)
    dash.momentum.value = 0.2
    dash.momentum.value = 0.01 + 9 * 0.01  # what one step from 0.01 x 9 sends back
    assert dash.momentum.value == 0.09999999999999999
    assert "momentum=0.1 " in dash.caption() and "momentum=0.1 " in dash.title.value
    ax = plots.running_stats(dash.result.trajectory)
    assert ax[0].get_title() == "momentum=0.1, batch size=16"
    dash.eps.value = 10**-4.75
    assert "eps=1.78e-05 " in dash.title.value
    assert plots.eps_curve(dash.result.eps).get_legend_handles_labels()[1][-1] == "eps=1.78e-05"
    assert [plots.fmt(v) for v in (None, 1e-5, 16, 0.30000000000000004)] == [
        "None",
        "1e-05",
        "16",
        "0.3",
    ]


def test_dashboard_display_carries_a_static_figure():
    """Without widget support (GitHub, nbviewer, untrusted) a reader gets the PNG, not
    the widget's text form ``VBox(children=...)``."""
    dash = widgets.dashboard(steps=10)
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["image/png"] == dash.png and dash.png.startswith("iVBOR")  # a PNG
    assert "children=" not in bundle["text/plain"] and "momentum=0.1" in bundle["text/plain"]
    assert widgets.dashboard(steps=10, plot=False)._repr_mimebundle_().get("image/png") is None
