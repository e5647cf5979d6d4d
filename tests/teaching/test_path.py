"""The learner's path: reading time, try first, no words of the project's process."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from bnlab.teaching import exercises, path, results
from bnlab.teaching.notebooks import ROOT, course_notebooks


def _nb(*cells):
    return {"cells": list(cells)}


def _md(text):
    return {"cell_type": "markdown", "source": text}


def _code(text, outputs=()):
    return {"cell_type": "code", "source": text, "outputs": list(outputs)}


def test_reading_time_counts_each_kind_at_its_rate():
    words = " ".join(["word"] * 200)  # one minute
    han = "规" * 500  # one minute
    code = "\n".join(f"x{i} = {i}" for i in range(15)) + "\n\n"  # one minute, blanks skipped
    printed = {"output_type": "stream", "name": "stdout", "text": "line\n" * 20}  # one minute
    figure = {"output_type": "display_data", "data": {"image/png": "", "text/plain": "<Figure>"}}
    widget = {
        "output_type": "display_data",
        "data": {"application/vnd.jupyter.widget-view+json": {}, "text/plain": "x" * 900},
    }
    nb = _nb(_md(words), _md(han), _code(code, [printed, figure, widget]))
    main, deep = path.reading_minutes(nb)
    assert main.prose == pytest.approx(2.0)
    assert main.code == pytest.approx(1.0)
    assert main.output == pytest.approx(1.0)
    assert main.figures == pytest.approx(0.5)
    assert deep.total == 0


def test_the_deep_dive_starts_at_its_heading_and_shown_source_counts_as_code():
    shown = {
        "output_type": "display_data",
        "data": {"text/markdown": "`bnlab.f`\n```python\n" + "a = 1\n" * 30 + "```"},
    }
    nb = _nb(
        _md("# Title\n" + "w " * 200), _md("## Deep dive: allocators"), _code("x = 1", [shown])
    )
    main, deep = path.reading_minutes(nb)
    assert main.prose == pytest.approx(201 / 200)
    assert deep.code == pytest.approx(1 / 15 + 2.0)
    assert path.deep_dive_start(nb) == 1


def test_every_teaching_notebooks_main_path_fits_its_budget():
    rows = path.reading_table(course_notebooks())
    teaching = [row for row in rows if path.is_teaching(Path(row[0]))]
    assert len(teaching) >= 9
    long = [
        f"{stem}: {main:.0f} min" for stem, main, _ in teaching if main > path.MAIN_PATH_MINUTES
    ]
    assert not long, f"main paths over {path.MAIN_PATH_MINUTES} minutes: {long}"
    total = sum(main for _, main, _ in teaching)
    assert total <= path.COURSE_MINUTES, f"the course's main path takes {total:.0f} minutes"


def test_the_process_words_scan_finds_issue_numbers_and_spares_citations():
    assert path.process_words("the goals of issue 17 are met")
    assert path.process_words("see #23 for the plan")
    assert path.process_words("no GPU was lent to this machine")
    assert not path.process_words("PyTorch PRs #100653 and #105650 fold Conv-BN")
    assert not path.process_words("pytorch/pytorch#12345 reports it")
    assert not path.process_words("Section 3 shows the 17 layers")


def _library_strings():
    for file in sorted((ROOT / "bnlab").rglob("*.py")):
        if file.name == "path.py" and file.parent.name == "teaching":
            continue  # the scan's own patterns
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield f"{file.relative_to(ROOT)}:{node.lineno}", node.value


def _learner_texts():
    for nb_path in course_notebooks():
        for where, text in path.notebook_texts(json.loads(nb_path.read_text())):
            yield f"{nb_path.stem} {where}", text
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        yield str(doc.relative_to(ROOT)), doc.read_text()
    for key, figure in results.load()["figures"].items():
        for field, value in figure.items():
            if isinstance(value, str):
                yield f"results {key}.{field}", value
    yield from _library_strings()  # docstrings are shown by show_source; tables are generated


def test_nothing_a_learner_reads_names_the_projects_process():
    found = [
        f"{where}: {words!r} ({why})"
        for where, text in _learner_texts()
        for words, why in path.process_words(text)
    ]
    assert not found, "words of the project's process:\n" + "\n".join(found)


def test_the_try_first_scan_finds_an_answer_shown_before_its_exercise():
    exercise = exercises.Exercise("merge", exercises.check_merge, answers=("merge_moments",))
    early = _nb(_code("show_source(merge_moments)"), _code("check_merge(my_merge)"))
    late = _nb(_code("check_merge(my_merge)"), _code("show_source(merge_moments)"))
    assert path.answers_shown_early(early, [exercise])
    assert not path.answers_shown_early(late, [exercise])


@pytest.mark.parametrize("nb_path", course_notebooks(), ids=lambda p: p.stem)
def test_no_notebook_shows_an_answer_before_its_exercise(nb_path):
    found = path.answers_shown_early(
        json.loads(nb_path.read_text()), exercises.EXERCISES.get(nb_path.stem, [])
    )
    assert not found, "\n".join(found)


def test_the_course_map_shows_each_notebooks_minutes():
    readme = (ROOT / "README.md").read_text()
    rows = path.reading_table(course_notebooks())
    assert path.course_map(readme, rows) == readme, (
        "the README's course map minutes are stale: "
        "python -m bnlab.teaching.notebooks reading-time --readme"
    )


def test_the_course_map_writer_sets_minutes_and_refuses_a_missing_row():
    table = "| notebook | what |\n| --- | --- |\n| `01_a` | goals |\n"
    readme = f"x\n<!-- course-map -->\n{table}<!-- /course-map -->\n"
    out = path.course_map(readme, [("01_a", 12.4, 0.2)])
    assert "| `01_a` | 12 min | — | goals |" in out
    assert path.course_map(out, [("01_a", 12.4, 0.2)]) == out
    with pytest.raises(ValueError, match="no row for 02_b"):
        path.course_map(readme, [("01_a", 1, 0), ("02_b", 1, 0)])


STATED = re.compile(r"(?:about|约)\s*(\d+)\s*(?:minutes|分钟)")


@pytest.mark.parametrize(
    "nb_path", [p for p in course_notebooks() if path.is_teaching(p)], ids=lambda p: p.stem
)
def test_each_notebook_states_its_measured_main_path_time(nb_path):
    nb = json.loads(nb_path.read_text())
    measured = path.reading_minutes(nb)[0].total
    head = "".join(path._text(c["source"]) for c in nb["cells"][:2])  # intro and 本节内容
    stated = [int(n) for n in STATED.findall(head)]
    assert len(stated) == 2, f"the intro and 本节内容 each state the main path's minutes: {stated}"
    assert all(abs(n - measured) <= 2 for n in stated), (
        f"stated {stated} minutes, measured {measured:.0f}: python -m bnlab.teaching.notebooks "
        "reading-time"
    )
