"""The errata of the five posts (勘误表): rows of notebook 10, read back and counted.

Each row of ``notebooks/10_errata.ipynb`` is a markdown card whose heading is
``### <post>-<n> · <section>`` and whose table has a ``判定 · verdict`` line, followed by
the code cell that measures the claim and ends with ``assert verdict == "<the verdict>"``.
:func:`rows` reads them back from the notebook, :func:`problems` lists what a row lacks
(a verdict from :data:`VERDICTS`, a measuring cell that asserts that verdict, at least one
row per post), and :func:`tally` counts verdicts per post for the notebook's closing table.

Serves notebook 10.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

POSTS = {  # the five posts by file name, each described in our words (cited, never copied)
    "000_e4755a9a28339627.txt": "an introduction: concept, formula, PyTorch's BatchNorm2d",
    "001_3890c17aaf692910.txt": "BN's role in convergence: ICS, the algorithm, an FAQ",
    "002_c1bff055ae152466.txt": "BN among regularizers and other normalizations; training",
    "003_52cbab7bad64c59b.txt": "notes on d2l's scratch BN and its LeNet comparison",
    "004_0dfa071f09f09739.txt": "terms, running statistics, training vs inference, folding",
}
VERDICTS = {  # verdict -> its Chinese label
    "right": "对",
    "wrong": "错",
    "right only under a convention": "仅在某种约定下成立",
    "unproven": "未经证实",
    "not run": "未运行",
}
HEADING = re.compile(r"^### (\d{3})-(\d+) · (.+)$", re.M)
VERDICT_LINE = re.compile(r"^\| 判定 · verdict \| \*\*(.+?)\*\*", re.M)


@dataclass(frozen=True)
class Row:
    """One erratum: its id (``"000-3"``), post file, section, verdict and measuring code."""

    id: str
    post: str
    section: str
    verdict: str | None
    code: str


def _post_file(prefix: str) -> str:
    return next((name for name in POSTS if name.startswith(prefix + "_")), prefix)


def rows(notebook: dict | Path) -> list[Row]:
    """Every row card of the notebook, with the source of the code cell that follows it."""
    nb = json.loads(Path(notebook).read_text()) if isinstance(notebook, Path) else notebook
    cells = nb["cells"]
    found = []
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        heading = HEADING.search(text) if cell["cell_type"] == "markdown" else None
        if heading is None:
            continue
        verdict = VERDICT_LINE.search(text)
        following = next((c for c in cells[i + 1 :] if c["cell_type"] == "code"), None)
        code = "".join(following["source"]) if following else ""
        found.append(
            Row(
                id=f"{heading.group(1)}-{heading.group(2)}",
                post=_post_file(heading.group(1)),
                section=heading.group(3).strip(),
                verdict=verdict.group(1) if verdict else None,
                code=code,
            )
        )
    return found


def problems(found: list[Row]) -> list[str]:
    """What the rows lack: a post without rows, a duplicate id, a verdict, its assert."""
    issues = [f"{post}: no row" for post in POSTS if not any(r.post == post for r in found)]
    counts = Counter(r.id for r in found)
    issues += [f"row {i} appears {n} times" for i, n in counts.items() if n > 1]
    for row in found:
        if row.verdict not in VERDICTS:
            issues.append(f"row {row.id}: verdict {row.verdict!r} is not one of {list(VERDICTS)}")
        elif f'assert verdict == "{row.verdict}"' not in row.code:
            issues.append(f'row {row.id}: its cell does not assert verdict == "{row.verdict}"')
    return issues


def tally(found: list[Row]) -> dict[str, Counter]:
    """Verdict counts per post file, in :data:`POSTS` order."""
    return {post: Counter(r.verdict for r in found if r.post == post) for post in POSTS}
