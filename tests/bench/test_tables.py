"""bnlab.bench.tables: the kernel benchmark's rows, on a tiny shape (numbers, not speeds)."""

from __future__ import annotations

from bnlab.bench import tables


def test_measure_returns_one_row_per_implementation_with_ratios_and_bandwidth():
    rows = tables.measure((4, 3, 5, 5), "cpu", repeat=1)
    assert [r["impl"] for r in rows] == ["torch native", "bnlab scratch", "bnlab cpu kernel"]
    assert rows[0]["fwd vs torch"] == 1.0 and rows[0]["fwd+bwd vs torch"] == 1.0
    for row in rows:
        assert row["nbytes"] == 4 * 3 * 5 * 5 * 4
        assert row["fwd"] > 0 and row["fwd+bwd"] > 0
        assert abs(row["fwd GB/s"] - 3 * row["nbytes"] / row["fwd"] / 1e9) < 1e-9
    text = tables.format_table(rows, limit=10.0, limit_name="copy")
    assert "bnlab cpu kernel" in text and "(4, 3, 5, 5)" in text
