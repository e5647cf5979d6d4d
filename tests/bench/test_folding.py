"""bnlab.bench.folding: unfused vs folded inference, side by side."""

from __future__ import annotations

import pytest

from bnlab.bench import folding


def test_speed_table_rows():
    rows = folding.speed_table(batch=1, image=32, repeats=1, threads=1)
    assert [r["model"] for r in rows] == ["lenet", "resnet18"]
    assert rows[1]["input"] == (1, 3, 32, 32)
    for r in rows:
        assert min(r["unfused_ms"], r["bnlab_ms"], r["fx_ms"]) > 0
        assert r["bnlab_speedup"] == pytest.approx(r["unfused_ms"] / r["bnlab_ms"])
        assert r["max_abs_diff"] < 1e-3
    assert "resnet18" in folding.format_speed_table(rows)
