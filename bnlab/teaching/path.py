"""The learner's path through a notebook: how long it takes, what it shows, in what order.

Three measures keep a notebook learnable, each with a test in ``tests/teaching/test_path.py``:

- **Reading time.** A notebook's *main path* is everything before its first heading that
  starts with "Deep dive"; the deep dive after it is optional. :func:`reading_minutes` times
  both at 200 English words a minute of prose (500 characters a minute of Chinese), 15
  non-blank lines a minute of code (code cells, and library source shown by
  ``show_source``), 20 lines a minute of printed output (streams and text/plain; widget
  views are not read) and 30 s a figure. Each main path stays within
  :data:`MAIN_PATH_MINUTES`, all teaching notebooks' together within
  :data:`COURSE_MINUTES` (10, the errata, is a reference read by card and is not counted).
- **Try first.** :func:`answers_shown_early` finds a function an exercise asks the learner
  to write (its ``answers`` in :data:`bnlab.teaching.exercises.EXERCISES`) shown, by name,
  in a cell before that exercise's checker runs.
- **No process words.** :func:`process_words` finds words of the project's own workflow
  (issue numbers, which machine was lent, maintenance notes) in what a learner reads.

``python -m bnlab.teaching.notebooks reading-time`` prints the table the README's course
map shows.

Serves every notebook and the README (`make test`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bnlab.teaching.notebooks import output_texts

MAIN_PATH_MINUTES = 40
COURSE_MINUTES = 300
WORDS_PER_MINUTE = 200
HAN_PER_MINUTE = 500
CODE_LINES_PER_MINUTE = 15
OUTPUT_LINES_PER_MINUTE = 20
FIGURE_SECONDS = 30

DEEP_DIVE = re.compile(r"^#{1,6}\s+(?:\d+\.?\s*)?(?:Deep dive|深入)", re.M | re.I)
HAN = re.compile(r"[\u3400-\u9fff]")
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’_-]*")
SOURCE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


@dataclass
class Minutes:
    """Reading time of one part of a notebook, by what is read."""

    prose: float = 0.0
    code: float = 0.0
    output: float = 0.0
    figures: float = 0.0

    @property
    def total(self) -> float:
        return self.prose + self.code + self.output + self.figures


def prose_minutes(text: str) -> float:
    """Minutes to read a markdown text: English words at 200/min, Han characters at 500/min."""
    han = len(HAN.findall(text))
    words = len(WORD.findall(HAN.sub(" ", text)))
    return words / WORDS_PER_MINUTE + han / HAN_PER_MINUTE


def _code_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def _add_outputs(cell: dict, into: Minutes) -> None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            into.output += _code_lines(_text(output["text"])) / OUTPUT_LINES_PER_MINUTE
            continue
        data = output.get("data", {})
        if "image/png" in data or "image/svg+xml" in data:
            into.figures += FIGURE_SECONDS / 60
        elif "application/vnd.jupyter.widget-view+json" in data:
            continue  # a widget view is used, not read
        elif "text/markdown" in data:
            shown = _text(data["text/markdown"])
            blocks = SOURCE_BLOCK.findall(shown)
            into.code += sum(_code_lines(b) for b in blocks) / CODE_LINES_PER_MINUTE
            into.prose += prose_minutes(SOURCE_BLOCK.sub(" ", shown))
        elif "text/plain" in data:
            into.output += _code_lines(_text(data["text/plain"])) / OUTPUT_LINES_PER_MINUTE


def deep_dive_start(nb: dict) -> int:
    """Index of the first cell of the deep dive (a heading "Deep dive ..."), or len(cells)."""
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown" and DEEP_DIVE.search(_text(cell["source"])):
            return index
    return len(nb["cells"])


def reading_minutes(nb: dict) -> tuple[Minutes, Minutes]:
    """(main path, deep dive) reading minutes of a notebook, by the measure above."""
    parts = (Minutes(), Minutes())
    start = deep_dive_start(nb)
    for index, cell in enumerate(nb["cells"]):
        part = parts[index >= start]
        source = _text(cell["source"])
        if cell["cell_type"] == "markdown":
            part.prose += prose_minutes(source)
        elif cell["cell_type"] == "code":
            part.code += _code_lines(source) / CODE_LINES_PER_MINUTE
            _add_outputs(cell, part)
    return parts


def is_teaching(path: Path) -> bool:
    """Teaching notebooks count toward the course's time; 10, the errata, is a reference."""
    return "errata" not in path.stem


def reading_table(paths: list[Path]) -> list[tuple[str, float, float]]:
    """(notebook stem, main-path minutes, deep-dive minutes) for each notebook."""
    rows = []
    for path in paths:
        main, deep = reading_minutes(json.loads(path.read_text()))
        rows.append((path.stem, main.total, deep.total))
    return rows


def format_reading_table(rows: list[tuple[str, float, float]]) -> str:
    lines = [f"{'notebook':<20} {'main path':>10} {'deep dive':>10}"]
    for stem, main, deep in rows:
        lines.append(f"{stem:<20} {main:>8.0f} m {deep:>8.0f} m")
    teaching = [r for r in rows if is_teaching(Path(r[0]))]
    lines.append(
        f"{'teaching, in all':<20} {sum(r[1] for r in teaching):>8.0f} m "
        f"{sum(r[2] for r in teaching):>8.0f} m"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Words of the project's own process
# --------------------------------------------------------------------------------------

PROCESS_WORDS = [
    (re.compile(r"\bissues?\s*#?\d+", re.I), "an issue number"),
    # this project's own issues are numbered in the tens; other projects' PRs cited by number
    # (PyTorch's #100653) have five digits or more
    (re.compile(r"(?<![\w/&])#\d{1,3}\b"), "an issue number of this project"),
    (re.compile(r"\blent\b|\bnot drawn\b|\bdevice time\b", re.I), "which machine was lent"),
    (re.compile(r"\b(?:TODO|FIXME|XXX)\b"), "a maintenance note"),
    (
        re.compile(r"\bmaintainers?\s+note\b|\bnote to (?:maintainers|self)\b", re.I),
        "a maintenance note",
    ),
    (
        re.compile(r"\bthis session\b|\bthe session\b|\bcloses? the issue\b", re.I),
        "the project's workflow",
    ),
]

# Citations of other projects' issues and pull requests name their project, which the
# number patterns above would otherwise flag: "PyTorch PR #47657", "pytorch/pytorch#12345".
CITATION = re.compile(
    r"(?:PR|pull request|pytorch/pytorch|numba/numba|NVIDIA/numba-cuda|[\w-]+/[\w.-]+)\s*#\d+"
    r"|PyTorch (?:issue|PR) #?\d+|github\.com/\S+",
    re.I,
)


def process_words(text: str) -> list[tuple[str, str]]:
    """(matched words, why) for each word of the project's process in a learner's text."""
    text = CITATION.sub(" ", text)
    found = []
    for pattern, why in PROCESS_WORDS:
        found.extend((m.group(0), why) for m in pattern.finditer(text))
    return found


def notebook_texts(nb: dict) -> list[tuple[str, str]]:
    """(where, text) of everything a learner reads in a notebook: prose, code and outputs."""
    texts = []
    for index, cell in enumerate(nb["cells"]):
        texts.append((f"cell {index}", _text(cell["source"])))
        for output in cell.get("outputs", []):
            texts += [(f"cell {index} output", text) for text in output_texts(output)]
    return texts


# --------------------------------------------------------------------------------------
# Try first: no answer before its exercise
# --------------------------------------------------------------------------------------


def _shown_names(cell: dict) -> str:
    """The text of a cell in which a shown function would appear: its code and outputs."""
    parts = [_text(cell["source"])]
    for output in cell.get("outputs", []):
        parts += output_texts(output)
    return "\n".join(parts)


def answers_shown_early(nb: dict, exercises: list) -> list[str]:
    """Where a function an exercise asks for is shown before that exercise's checker runs.

    ``exercises`` are :class:`bnlab.teaching.exercises.Exercise` entries with ``checker``
    (the function that checks the learner's answer) and ``answers`` (the names of bnlab's
    functions that solve it). A name counts as shown in a cell's code (a call, a
    ``show_source``) or in its outputs (printed source), before the first code cell that
    calls the checker.
    """
    cells = nb["cells"]
    found = []
    for exercise in exercises:
        checker = exercise.checker.__name__
        first = next(
            (
                i
                for i, c in enumerate(cells)
                if c["cell_type"] == "code" and re.search(rf"\b{checker}\(", _text(c["source"]))
            ),
            None,
        )
        if first is None:
            continue
        for name in exercise.answers:
            pattern = re.compile(rf"\b{re.escape(name)}\b")
            for index in range(first):
                if cells[index]["cell_type"] == "code" and pattern.search(
                    _shown_names(cells[index])
                ):
                    found.append(
                        f"cell {index} shows {name}, the answer of {exercise.name} "
                        f"(checked in cell {first})"
                    )
                    break
    return found


# --------------------------------------------------------------------------------------
# The README's course map shows each notebook's minutes
# --------------------------------------------------------------------------------------

COURSE_MAP = re.compile(r"(<!-- course-map -->\n)(.*?)(<!-- /course-map -->)", re.S)
MAP_HEADER = "| notebook | main path | deep dive | what you learn |\n| --- | --- | --- | --- |\n"
MAP_ROW = re.compile(r"^\| `(\d\d_\w+)` \|(?: [^|]* \| [^|]* \|)? (.*) \|$", re.M)


def _minutes(value: float) -> str:
    return f"{value:.0f} min" if value >= 0.5 else "—"


def course_map(readme: str, rows: list[tuple[str, float, float]]) -> str:
    """The README with its course map's minute columns set from ``rows`` (reading_table's)."""
    found = COURSE_MAP.search(readme)
    if not found:
        raise ValueError("the README has no <!-- course-map --> block")
    minutes = {stem: (main, deep) for stem, main, deep in rows}
    lines = []
    for stem, what in MAP_ROW.findall(found.group(2)):
        if stem not in minutes:
            raise ValueError(f"the course map lists {stem}, which is not a course notebook")
        main, deep = minutes[stem]
        lines.append(f"| `{stem}` | {_minutes(main)} | {_minutes(deep)} | {what} |\n")
    missing = sorted(set(minutes) - {stem for stem, _ in MAP_ROW.findall(found.group(2))})
    if missing:
        raise ValueError(f"the course map has no row for {', '.join(missing)}: add one by hand")
    table = MAP_HEADER + "".join(lines)
    return readme[: found.start(2)] + table + readme[found.end(2) :]
