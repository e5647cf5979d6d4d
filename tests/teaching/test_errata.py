"""bnlab.teaching.errata: notebook 10's rows read back, checked and counted."""

from __future__ import annotations

from bnlab.teaching import errata
from bnlab.teaching.notebooks import NOTEBOOK_DIR


def _card(row_id, verdict, section="1.简介"):
    return {"cell_type": "markdown", "source": [
        f"### {row_id} · {section}\n", "\n", "| | |\n", "|---|---|\n",
        f"| 判定 · verdict | **{verdict}** |\n",
    ]}  # fmt: skip


def _code(text):
    return {"cell_type": "code", "source": [text], "outputs": []}


def test_rows_pair_each_card_with_its_measuring_cell():
    nb = {"cells": [
        _card("000-1", "wrong"), _code('verdict = "wrong"\nassert verdict == "wrong"'),
        {"cell_type": "markdown", "source": ["## 001\n"]},
        _card("001-1", "unproven", "2.3 作用"),
        _code('verdict = "right"\nassert verdict == "right"'),
        _card("001-2", "maybe"), _code("pass"),
    ]}  # fmt: skip
    found = errata.rows(nb)
    assert [(r.id, r.post[:3], r.section, r.verdict) for r in found] == [
        ("000-1", "000", "1.简介", "wrong"),
        ("001-1", "001", "2.3 作用", "unproven"),
        ("001-2", "001", "1.简介", "maybe"),
    ]
    issues = errata.problems(found)
    assert 'row 001-1: its cell does not assert verdict == "unproven"' in issues
    assert any(i.startswith("row 001-2: verdict 'maybe'") for i in issues)
    assert any(i.startswith("002_") and i.endswith("no row") for i in issues)
    assert not any(i.startswith("row 000-1") for i in issues)


def test_the_errata_notebook_has_rows_for_every_post_each_with_verdict_and_assert():
    found = errata.rows(NOTEBOOK_DIR / "10_errata.ipynb")
    assert errata.problems(found) == []
    counts = {post[:3]: sum(c.values()) for post, c in errata.tally(found).items()}
    assert all(n >= 2 for n in counts.values()), counts
    assert sum(counts.values()) == len(found) >= 25


def test_the_errata_notebook_records_its_tally():
    from bnlab.teaching.results import notebook_results

    assert "10.errata" in notebook_results(NOTEBOOK_DIR / "10_errata.ipynb")
