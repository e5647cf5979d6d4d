"""bnlab.experiments.sweeps: the per-epoch table, the best of a grid, t-based intervals."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.experiments import sweeps
from bnlab.experiments.train import History


def test_per_epoch_table_shows_mean_and_std_per_run():
    runs = {
        "a": [History(test_acc=[0.1, 0.5]), History(test_acc=[0.3, 0.7])],
        "b": [History(test_acc=[0.2, 0.4])],
    }
    lines = sweeps.per_epoch_table(runs).splitlines()
    assert lines[0].split() == ["epoch", "a", "b"]
    assert lines[1].split() == ["1", "0.200", "±", "0.141", "0.200", "±", "0.000"]
    assert lines[2].split()[:4] == ["2", "0.600", "±", "0.141"]


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062),
        (0.975, 4, 2.7764),
        (0.975, 9, 2.2622),
        (0.995, 4, 4.6041),
        (0.95, 30, 1.6973),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert sweeps.t_quantile(p, df) == pytest.approx(expected, abs=2e-4)
    assert sweeps.t_cdf(sweeps.t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_mean_and_interval_uses_t_and_the_sample_std():
    values = [0.80, 0.82, 0.79, 0.85, 0.84]
    mean, std, half = sweeps.mean_and_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert half == pytest.approx(2.7764 * std / 5**0.5, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        sweeps.mean_and_interval([0.8])


def test_best_value_picks_the_highest_mean_accuracy():
    def run(acc):
        return History(test_acc=[acc])

    results = {0.1: [run(0.5), run(0.7)], 1.0: [run(0.8), run(0.6)], 3.0: [run(0.1), run(0.1)]}
    assert sweeps.best_value(results) == (1.0, pytest.approx(0.7))


def test_compare_seeds_needs_separated_intervals():
    low, high = [0.70, 0.72, 0.71], [0.80, 0.81, 0.82]
    assert sweeps.compare_seeds(high, low, ("BN", "plain")) == "BN ahead"
    assert sweeps.compare_seeds(low, high, ("BN", "plain")) == "plain ahead"
    noisy = [0.60, 0.90, 0.75]  # same mean region, wide interval
    assert sweeps.compare_seeds(noisy, high, ("a", "b")) == "intervals overlap"
