"""bnlab.teaching.show: sources found by parsing, comparisons, outcomes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import modules
from bnlab.teaching import show


def _example(a, b=2):
    """A docstring that

    spans lines."""
    total = a + b
    limit = [1, 2]
    return total if total in limit else None


def test_source_with_and_without_docstring_and_one_statement():
    full = show.source(_example)
    assert full.startswith("def _example(a, b=2):") and "spans lines" in full
    bare = show.source(_example, docstring=False)
    assert "spans lines" not in bare and "total = a + b" in bare and "def _example" in bare
    assert show.statement(_example, "limit") == "limit = [1, 2]\n"
    with pytest.raises(LookupError, match="assigns no 'patterns'"):
        show.statement(_example, "patterns")
    with pytest.raises(TypeError, match="cannot show"):
        show.source(len)


def test_compare_prints_one_line_and_returns_the_largest_difference(capsys):
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert show.compare("same", a, a.clone()) == 0.0
    assert show.compare("off", a, a + 1e-3) == pytest.approx(1e-3)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("same") and "exact: True" in out[0]
    assert "exact: False" in out[1] and "approximate: False" in out[1]


def test_compare_training_finds_agreement_and_a_difference():
    dt = torch.float64
    torch.manual_seed(0)
    batches = [(torch.randn(6, 3, dtype=dt), torch.randn(6, 3, dtype=dt)) for _ in range(3)]
    ours, ref = modules.BatchNorm1d(3, dtype=dt), nn.BatchNorm1d(3, dtype=dt)
    rows = show.compare_training(ours, ref, batches)
    assert len(rows) == 3 and list(rows[0]) == [
        "output", "dx", "dweight", "dbias", "running_mean", "running_var",
    ]  # fmt: skip
    assert max(max(r.values()) for r in rows) < 1e-12
    off = nn.BatchNorm1d(3, dtype=dt, momentum=0.5)
    rows = show.compare_training(modules.BatchNorm1d(3, dtype=dt), off, batches)
    assert rows[0]["running_mean"] > 1e-3 and rows[0]["output"] < 1e-12


def test_outcome_returns_the_value_or_the_error_line():
    assert show.outcome(lambda: 3) == 3
    assert show.outcome(lambda: 1 / 0) == "ZeroDivisionError: division by zero"
    assert len(show.outcome(lambda: int("x" * 200), width=10)) < 40


def test_holds_prints_the_claim_or_raises_with_it(capsys):
    import torch

    from bnlab.teaching.show import holds

    holds(torch.tensor(0.5) < 1, "half is less than one")
    assert capsys.readouterr().out == "✓ half is less than one\n"
    with pytest.raises(AssertionError, match="does not hold: two is less than one"):
        holds(2 < 1, "two is less than one")
