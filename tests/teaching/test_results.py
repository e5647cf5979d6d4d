"""bnlab.teaching.results: the store, the README generated from it, and their agreement."""

from __future__ import annotations

import json

import pytest

from bnlab.teaching import results
from bnlab.teaching.notebooks import course_notebooks


def test_record_prints_always_and_writes_only_in_a_recorded_full_run(tmp_path, monkeypatch, capsys):
    store = tmp_path / "results.json"
    monkeypatch.delenv(results.RECORD_ENV, raising=False)
    results.record("05.x", 0.5, "a figure", path=store)
    assert capsys.readouterr().out == "[result] 05.x = 0.5\n" and not store.exists()
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "1")
    results.record("05.x", 0.5, "a figure", path=store)
    assert not store.exists()  # FAST numbers never reach the store
    monkeypatch.setenv("BNLAB_FAST", "0")
    results.record("05.x", 0.25, "a figure", "0.25 (a quarter)", path=store)
    results.record("bench.y", [1, 2], "another", table="claims", path=store)
    data = json.loads(store.read_text())
    assert data["schema"] == results.SCHEMA
    assert data["figures"]["05.x"]["text"] == "0.25 (a quarter)"
    assert data["figures"]["05.x"]["source"] == "05_lenet"
    assert data["figures"]["bench.y"]["source"] == "bench"


def test_record_refuses_unknown_tables_odd_keys_and_multiline_text():
    with pytest.raises(ValueError, match="table must be one of"):
        results.record("05.x", 1, "w", table="nope")
    with pytest.raises(ValueError, match="key must be"):
        results.record("05 x", 1, "w")
    with pytest.raises(ValueError, match="one line"):
        results.record("05.x", 1, "w", "two\nlines")


def test_render_and_write_readme_round_trip(tmp_path):
    data = {"schema": 1, "figures": {
        "b": {"table": "results", "what": "second", "text": "2 | 3", "source": "bench"},
        "a": {"table": "results", "what": "first", "text": "1", "source": "05_lenet"},
        "c": {"table": "claims", "what": "a claim", "text": "false: x", "source": "08_claims"},
    }}  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results -->\nold\n<!-- /results -->\nend\n")
    assert results.write_readme(data, readme)
    block = results.readme_block(readme.read_text())
    assert block == results.render(data)
    assert block.index("| first |") < block.index("| second |") < block.index("| a claim |")
    assert "2 \\| 3" in block and readme.read_text().endswith("end\n")
    assert not results.write_readme(data, readme)  # nothing changes the second time


def test_notebook_results_reads_result_lines(tmp_path):
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "stream", "name": "stdout", "text": ["x\n", "[result] 05.a = 0.5 ± 0.1\n"]},
    ]}, {"cell_type": "markdown", "source": ["[result] 05.b = no"]}]}  # fmt: skip
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert results.notebook_results(path) == {"05.a": "0.5 ± 0.1"}


# ------------------------------------------------------------------ the course's own figures


@pytest.mark.parametrize("block", list(results.BLOCKS))
def test_readme_blocks_are_generated_from_the_store(block):
    generated = results.readme_block(results.README.read_text(), block)
    assert generated == results.render(results.load(), block), "run `make readme`"


def test_write_readme_fills_every_block(tmp_path):
    data = {"schema": 1, "figures": {
        "a": {"table": "results", "what": "first", "text": "1", "source": "05_lenet"},
        "timing.1-x": {"table": "timings", "what": "make x", "text": "3 s", "source": "timings"},
    }}  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- timings -->\nold\n<!-- /timings -->\n<!-- results -->\n<!-- /results -->\n"
    )
    assert results.write_readme(data, readme)
    assert "| make x | 3 s | timings |" in results.readme_block(readme.read_text(), "timings")
    assert "| first |" in results.readme_block(readme.read_text())
    assert "make x" not in results.readme_block(readme.read_text())


def test_store_and_notebook_outputs_agree_both_ways():
    store = results.load()["figures"]
    shown = {}
    for path in course_notebooks():
        for key, text in results.notebook_results(path).items():
            shown[key] = (path.stem, text)
    assert shown, "no notebook's stored outputs record a figure"
    for key, (stem, text) in shown.items():
        assert key in store, f"{stem} shows {key}, which the store lacks: re-run make notebooks"
        assert store[key]["text"] == text and store[key]["source"] == stem, key
    for key, figure in store.items():
        if figure["source"] not in results.MEASURED_OUTSIDE_NOTEBOOKS:
            assert key in shown, f"the store has {key}, which no notebook output shows"
    assert any(f["source"] == "bench" for f in store.values()), "run make bench"


def test_drop_source_removes_a_sources_figures_only_while_recording(tmp_path, monkeypatch):
    store = tmp_path / "results.json"
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "0")
    results.record("bench.old", 1, "old", table="bench", path=store)
    results.record("05.kept", 2, "kept", path=store)
    monkeypatch.setenv(results.RECORD_ENV, "0")
    assert results.drop_source("bench", store) == []  # not recording: nothing changes
    monkeypatch.setenv(results.RECORD_ENV, "1")
    assert results.drop_source("bench", store) == ["bench.old"]
    assert set(results.load(store)["figures"]) == {"05.kept"}
