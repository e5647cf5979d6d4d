"""bnlab.teaching.results: the store, the README generated from it, and their agreement."""

from __future__ import annotations

import json
import os
import re

import pytest

from bnlab.teaching import results
from bnlab.teaching.notebooks import course_notebooks


def test_record_prints_always_and_writes_only_in_a_recorded_full_run(tmp_path, monkeypatch, capsys):
    store = tmp_path / "results.json"
    monkeypatch.delenv(results.RECORD_ENV, raising=False)
    assert results.record("05.x", 0.5, "a figure", path=store) is None  # nothing to echo twice
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


def test_record_in_a_kernel_shows_one_line_with_its_value_in_the_metadata(monkeypatch):
    shown = []

    class Shell:
        kernel = object()

    monkeypatch.setattr("IPython.get_ipython", lambda: Shell())
    monkeypatch.setattr("IPython.display.display", lambda *a, **k: shown.append((a, k)))
    results.record("05.y", (0.25, {"a": 1}), "a figure", "a quarter")
    ((args, kwargs),) = shown
    assert args == ({"text/plain": "[result] 05.y = a quarter"},) and kwargs["raw"]
    assert kwargs["metadata"] == {results.RESULT_META: {"key": "05.y", "value": [0.25, {"a": 1}]}}


def test_result_outputs_read_display_outputs_with_values_and_keep_duplicates(tmp_path):
    meta = {results.RESULT_META: {"key": "05.a", "value": [1, 2]}}
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {"text/plain": "[result] 05.a = 1 and 2"},
         "metadata": meta},
        {"output_type": "stream", "name": "stdout", "text": "[result] 05.a = again\n"},
    ]}]}  # fmt: skip
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert results.result_outputs(path) == [("05.a", "1 and 2", [1, 2]), ("05.a", "again", None)]


def test_code_hash_follows_the_code_cells_only():
    def nb(code, markdown="prose"):
        code_cell = {"cell_type": "code", "source": code, "outputs": [{"text": "out"}]}
        return {"cells": [{"cell_type": "markdown", "source": markdown}, code_cell]}

    assert results.code_hash(nb("x = 1")) == results.code_hash(nb("x = 1", "other prose"))
    assert results.code_hash(nb("x = 1")) != results.code_hash(nb("x = 2"))
    assert results.code_hash(nb(["x = 1\n", "y"])) == results.code_hash(nb("x = 1\ny"))


def test_section_seconds_add_up_each_sections_cells():
    def cell(start, end):
        times = {"iopub.execute_input": f"2026-01-01T00:00:{start:02d}.000000Z",
                 "shell.execute_reply": f"2026-01-01T00:00:{end:02d}.500000Z"}  # fmt: skip
        return {"cell_type": "code", "source": "", "metadata": {"execution": times}}

    def md(text):
        return {"cell_type": "markdown", "source": text}

    nb = {"cells": [cell(0, 1), md("## 1. First"), cell(2, 4), cell(5, 5), md("### a part"),
                    cell(6, 7)]}  # fmt: skip
    assert results.section_seconds(nb) == {"(top)": 1.5, "1. First": 2.5 + 0.5 + 1.5}


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
        for key, text, value in results.result_outputs(path):
            assert key not in shown, (
                f"{key} is recorded twice ({shown.get(key, ('',))[0]}, {path.stem})"
            )
            shown[key] = (path.stem, text, value)
    assert shown, "no notebook's stored outputs record a figure"
    for key, (stem, text, value) in shown.items():
        assert key in store, f"{stem} shows {key}, which the store lacks: re-run make notebooks"
        assert store[key]["text"] == text and store[key]["source"] == stem, key
        assert value is not None, f"{stem} shows {key} without its value: re-run make notebooks"
        assert store[key]["value"] == value, (
            f"{key}: the store's value differs from {stem}'s output"
        )
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


# -------------------------------------------------------- writing: atomic, locked, a run at once


def _figure(n: int = 0) -> dict:
    return {"table": "results", "what": f"figure {n}", "text": str(n), "value": n,
            "source": "05_lenet", "recorded": "2025-01-01"}  # fmt: skip


def _big_store(path) -> dict:
    """A store whose write takes a while (a long text), so that kills land inside writes."""
    figure = dict(_figure(), value="x" * 200_000)
    data = {"schema": results.SCHEMA, "figures": {"05.padding": figure}}
    results.save(data, path)
    return data


def _in_child(target, *args):
    """Run ``target(*args)`` in a forked child (instant: no interpreter to start)."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    child.start()
    return child


def _write_figures(path, prefix: str, count: int) -> None:
    for n in range(count):
        results.write_figure(f"05.{prefix}.{n}", n, f"figure {n}", str(n), "results", "05_lenet",
                             path)  # fmt: skip


def test_save_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    store = tmp_path / "results" / "results.json"
    results.save({"schema": results.SCHEMA, "figures": {"05.a": _figure()}}, store)
    inode = store.stat().st_ino
    results.write_figure("05.b", 1, "b", "1", "results", "05_lenet", store)
    assert store.stat().st_ino != inode, "the store was rewritten in place, not replaced"
    assert set(results.load(store)["figures"]) == {"05.a", "05.b"}
    stray = [p.name for p in store.parent.iterdir() if p.name != "results.json"]
    assert all(name.endswith(".lock") for name in stray), stray


def test_concurrent_writers_lose_nothing(tmp_path):
    store = tmp_path / "results.json"
    writers = [_in_child(_write_figures, store, f"w{i}", 80) for i in range(3)]
    for child in writers:
        child.join(120)
        assert child.exitcode == 0, "a writer crashed (a half-written store read back?)"
    figures = results.load(store)["figures"]
    lost = [f"05.w{i}.{n}" for i in range(3) for n in range(80) if f"05.w{i}.{n}" not in figures]
    assert not lost, f"{len(lost)} of 240 figures lost, e.g. {lost[:3]}"
    assert len(figures) == 240


def _write_forever(path) -> None:
    n = 0
    while True:
        results.write_figure(f"05.loop.{n % 50}", n, "loop", str(n), "results", "05_lenet", path)
        n += 1


def test_a_writer_killed_at_random_moments_never_leaves_unreadable_json(tmp_path):
    import random
    import signal
    import time

    store = tmp_path / "results.json"
    before = _big_store(store)
    rng = random.Random(0)
    for _kill in range(12):  # a dozen kills, each at a random moment of a busy writer
        child = _in_child(_write_forever, store)
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        figures = results.load(store)["figures"]  # raises on a truncated file
        assert set(before["figures"]) <= set(figures)
    results.write_figure(
        "05.after", 1, "after", "1", "results", "05_lenet", store
    )  # not locked out
    assert not list(tmp_path.glob("*.tmp")), "a killed writer's temporary file was left behind"


def test_a_runs_figures_reach_the_store_together_at_its_end(tmp_path, monkeypatch):
    """make notebooks: record appends to the run's pending file; commit replaces its set."""
    store = tmp_path / "results.json"
    other = dict(_figure(3), source="08_claims")
    figures = {"05.old": _figure(1), "05.kept": _figure(2), "08.other": other}
    results.save({"schema": results.SCHEMA, "figures": figures}, store)
    pending = tmp_path / "pending.jsonl"
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "0")
    monkeypatch.setenv(results.PENDING_ENV, str(pending))
    results.record("05.kept", 20, "kept", path=store)
    results.record("05.new", 30, "new", path=store)
    assert set(results.load(store)["figures"]) == {"05.old", "05.kept", "08.other"}  # untouched
    assert (
        results.main(["commit", str(pending), "--source", "05_lenet", "--store", str(store)]) == 0
    )
    figures = results.load(store)["figures"]
    assert set(figures) == {"05.kept", "05.new", "08.other"}  # 05.old: no longer recorded
    assert figures["05.kept"]["value"] == 20 and not pending.exists()


def test_a_failed_run_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = tmp_path / "results.json"
    figures = {"bench.a": dict(_figure(), source="bench")}
    results.save({"schema": results.SCHEMA, "figures": figures}, store)
    before = store.read_bytes()
    monkeypatch.setenv(results.RECORD_ENV, "1")
    monkeypatch.setenv("BNLAB_FAST", "0")
    with pytest.raises(RuntimeError, match="the run failed"):
        with results.recorded_together("bench", store):
            results.record("bench.b", 1, "b", table="bench", path=store)
            raise RuntimeError("the run failed")
    assert store.read_bytes() == before
    assert results.PENDING_ENV not in os.environ
    with results.recorded_together("bench", store):
        results.record("bench.b", 1, "b", table="bench", path=store)
        results.record("bench.c", 2, "c", table="bench", path=store)
        assert store.read_bytes() == before  # nothing is written before the run's end
    assert set(results.load(store)["figures"]) == {"bench.b", "bench.c"}


def test_a_pending_file_cut_short_is_not_committed(tmp_path):
    """A writer killed mid-line leaves a run that did not finish: it must not reach the store."""
    store, pending = tmp_path / "results.json", tmp_path / "pending.jsonl"
    results.save({"schema": results.SCHEMA, "figures": {"05.a": _figure()}}, store)
    before = store.read_bytes()
    pending.write_text(json.dumps(["05.b", _figure(1)]) + '\n["05.c", {"tab')
    with pytest.raises(ValueError, match=r"line 2, is not a recorded figure.*run it again"):
        results.commit(pending, "05_lenet", store)
    assert store.read_bytes() == before and pending.exists()


def test_every_notebooks_outputs_came_from_its_current_code():
    runs = results.load().get("notebooks", {})
    for path in course_notebooks():
        assert path.stem in runs, f"the store has no full run of {path.stem}: run make notebooks"
        assert runs[path.stem]["code"] == results.code_hash(path), (
            f"{path.name}'s code changed after its outputs were stored: "
            f"make notebooks NOTEBOOKS={path.relative_to(results.ROOT)}"
        )


def _outputs_text(stem: str) -> str:
    nb = json.loads(next(p for p in course_notebooks() if p.stem == stem).read_text())
    return "\n".join(
        "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
        for c in nb["cells"]
        for o in c.get("outputs", [])
    )


def test_the_tables_notebooks_print_from_the_store_match_the_store():
    from bnlab.bench import cpu, folding

    store = results.load()
    assert cpu.format_stored_table(store) in _outputs_text("04_numba_kernels"), "re-run notebook 04"
    rows = folding.stored_context_rows(store["figures"])
    assert rows and folding.format_context_table(rows) in _outputs_text("07_fusion"), "re-run 07"


def test_every_store_key_the_errata_reads_exists():
    nb = json.loads(next(p for p in course_notebooks() if p.stem == "10_errata").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    keys = set(re.findall(r"[\"'](0\d\.[\w.\-]+|bench\.[\w.\-]+|timing\.[\w.\-]+)[\"']", code))
    assert keys, "notebook 10 reads no store key: the pattern above is out of date"
    missing = sorted(k for k in keys if k not in results.load()["figures"])
    assert not missing, f"notebook 10 reads store keys that are gone: {missing}"
