"""bnlab.experiments.sweeps: the per-epoch table of several runs."""

from __future__ import annotations

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
