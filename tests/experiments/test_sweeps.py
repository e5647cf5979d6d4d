"""bnlab.experiments.sweeps: the per-epoch table, the best of a grid, t-based intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

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


def test_mean_and_interval_uses_t_and_the_sample_std():
    values = [0.80, 0.82, 0.79, 0.85, 0.84]
    mean, std, half = sweeps.mean_and_interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert half == pytest.approx(2.7764 * std / 5**0.5, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        sweeps.mean_and_interval([0.8])


def test_best_value_picks_the_highest_mean_validation_accuracy():
    def run(val, test):
        return History(val_acc=[val], test_acc=[test])

    results = {
        0.1: [run(0.5, 0.9), run(0.7, 0.9)],  # best on the test set: never looked at
        1.0: [run(0.8, 0.1), run(0.6, 0.1)],
        3.0: [run(0.1, 0.1), run(0.1, 0.1)],
    }
    assert sweeps.best_value(results) == (1.0, pytest.approx(0.7))
    assert sweeps.final_accuracy(results, "test_acc")[0].tolist() == [0.9, 0.1, 0.1]
    with pytest.raises(ValueError, match="n_val"):
        sweeps.best_value({0.1: [History(test_acc=[0.5])]})
    with pytest.raises(ValueError, match="key must be one of"):
        sweeps.final_accuracy(results, "train_acc")


# ------------------------------------------------------------------ compare


BN = [0.8708, 0.8872, 0.8801]
PLAIN = [0.7378, 0.7436, 0.7412]


def test_compare_matches_scipys_welch_interval_and_p_value():
    got = sweeps.compare(BN, PLAIN, ("BN", "plain"))
    reference = stats.ttest_ind(BN, PLAIN, equal_var=False)
    low, high = reference.confidence_interval(0.95)
    assert got.test == "Welch t" and got.n == (3, 3)
    assert got.difference == pytest.approx(np.mean(BN) - np.mean(PLAIN), abs=1e-15)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert got.verdict == "BN ahead" and got.resolved
    # Welch by hand: the interval is d +- t(df) * se with the Welch-Satterthwaite df
    a, b = np.var(BN, ddof=1) / 3, np.var(PLAIN, ddof=1) / 3
    df = (a + b) ** 2 / (a**2 / 2 + b**2 / 2)
    assert got.half_width == pytest.approx(stats.t.ppf(0.975, df) * (a + b) ** 0.5, rel=1e-10)


def test_compare_paired_matches_scipys_paired_test():
    first, second = [0.61, 0.70, 0.66, 0.75], [0.60, 0.67, 0.65, 0.71]
    got = sweeps.compare(first, second, ("a", "b"), paired=True, confidence=0.9)
    reference = stats.ttest_rel(first, second)
    low, high = reference.confidence_interval(0.9)
    assert got.test == "paired t" and got.confidence == 0.9
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    # the per-seed differences are consistent, so pairing resolves what Welch cannot
    assert got.verdict == "a ahead"
    assert sweeps.compare(first, second, ("a", "b"), confidence=0.9).verdict == "not resolved"


def test_compare_names_the_arm_ahead_either_way_and_states_what_it_cannot_resolve():
    behind = sweeps.compare(PLAIN, BN, ("plain", "BN"))
    assert behind.verdict == "BN ahead" and behind.difference < 0
    assert behind.sentence().startswith("BN ahead by 0.139 [")
    low, high = sorted((-behind.high, -behind.low))
    assert behind.sentence().startswith(f"BN ahead by 0.139 [{low:.3f}, {high:.3f}]")
    close = sweeps.compare([0.80, 0.83, 0.78], [0.81, 0.79, 0.82], ("x", "y"))
    assert close.verdict == "not resolved" and not close.resolved
    assert close.sentence().startswith("not resolved with 3 seeds")
    assert f"larger than {close.half_width:.3f}" in close.sentence()
    assert "overlap" not in close.sentence() and "no difference" not in close.sentence()


def test_compare_refuses_what_it_cannot_test():
    with pytest.raises(ValueError, match="at least 2 values per arm"):
        sweeps.compare([0.8], [0.7, 0.72], ("a", "b"))
    with pytest.raises(ValueError, match="same seeds"):
        sweeps.compare([0.8, 0.81, 0.79], [0.7, 0.72], ("a", "b"), paired=True)
    with pytest.raises(ValueError, match="confidence"):
        sweeps.compare([0.8, 0.81], [0.7, 0.72], ("a", "b"), confidence=95)


def test_compare_lower_is_better_and_refuses_runs_that_never_got_there():
    fast, slow = [150, 250, 240], [300, 390, 350]
    got = sweeps.compare(slow, fast, ("Xavier", "Xavier x 4"), paired=True, lower_is_better=True)
    assert got.verdict == "Xavier x 4 ahead" and got.difference == pytest.approx(400 / 3)
    assert got.sentence().startswith("Xavier x 4 ahead by 133.333 [")
    with pytest.raises(ValueError, match="never reached"):
        sweeps.compare([150, math.inf], [300, 300], ("a", "b"))


def test_compare_without_any_spread_resolves_nothing():
    got = sweeps.compare([0.094] * 3, [0.5, 0.6, 0.7], ("stalled", "trained"))
    assert got.verdict == "trained ahead"  # one arm varies: Welch's interval exists
    for first, second, paired in (
        ([0.094] * 3, [0.1] * 3, False),
        ([0.5, 0.6], [0.46, 0.56], True),
    ):
        flat = sweeps.compare(first, second, ("a", "b"), paired=paired)
        assert flat.verdict == "not resolved" and flat.p_value == 1.0
        assert "cannot estimate its spread" in flat.sentence()


def test_compare_can_name_a_measure_higher_instead_of_ahead():
    got = sweeps.compare(
        [0.9, 1.0, 1.1], [0.1, 0.15, 0.12], ("noisy BN", "no BN"), paired=True, word="higher"
    )
    assert got.verdict == "noisy BN higher" and got.sentence().startswith("noisy BN higher by")


def test_compare_steps_uses_ranks_when_runs_never_reached_the_threshold():
    finite = sweeps.compare_steps([300, 390, 350], [150, 250, 240], ("Xavier", "x4"), cap=645)
    assert isinstance(finite, sweeps.Comparison) and finite.verdict == "x4 ahead"
    never = [math.inf] * 5
    got = sweeps.compare_steps([50, 75, 50, 100, 50], never, ("BN", "plain"), cap=645)
    reference = stats.mannwhitneyu([50, 75, 50, 100, 50], [646] * 5, alternative="two-sided")
    assert got.p_value == pytest.approx(reference.pvalue) and got.verdict == "BN ahead"
    assert got.reached == (5, 0) and "5 of 5 BN runs and 0 of 5 plain runs" in got.sentence()
    mixed = sweeps.compare_steps([300, math.inf, 350], [250, math.inf, 400], ("a", "b"), cap=645)
    assert mixed.verdict == "not resolved" and not mixed.resolved
    assert sweeps.compare_steps(never, never, ("a", "b"), cap=645).p_value == 1.0


def test_compare_steps_ranks_counts_that_tie_on_the_evaluation_grid():
    got = sweeps.compare_steps([25] * 5, [125] * 5, ("BN", "plain"), cap=430)
    assert isinstance(got, sweeps.CensoredComparison) and got.verdict == "BN ahead"
    assert got.medians == (25, 125) and "median 25 vs 125 steps" in got.sentence()


def test_a_difference_that_rounds_to_zero_reads_without_a_minus_sign():
    got = sweeps.compare([0.8501, 0.8399, 0.86], [0.8502, 0.84, 0.8601], ("a", "b"), paired=True)
    assert "-0.000" not in got.sentence() and got.interval().startswith("0.000 [")
