"""The bilingual glossary (术语表) ``docs/glossary.md``, read and checked against the course.

:func:`parse` reads the glossary's markdown table into :class:`Entry` rows (the English term as
the course writes it, one preferred Chinese term, its synonyms, the notebooks it appears in).
:func:`course_text` collects the course's own text by kind: the notebooks' markdown or code
cells, ``README.md``, or bnlab's docstrings (this module's excepted). Two checks use them:

- :func:`missing_terms`: entries whose English term the course never writes, outside the
  glossary (entries marked ``(09)`` wait for notebook 09 while it does not exist);
- :func:`synonym_uses`: places where the course's own Chinese prose writes a synonym instead of
  the preferred term. Quotations of the posts are exempt: blockquote lines (``> ``) and text
  inside 「」 or “” quotation marks.

``python -m bnlab.teaching.glossary`` prints what both checks find.

Serves the README and every notebook's 中文 summary (notebooks 01-08); checked by ``make test``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GLOSSARY = ROOT / "docs" / "glossary.md"
LATER = "(09)"  # the where-mark of terms that notebook 09 will introduce
KINDS = ("markdown", "code", "readme", "docstrings")

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
QUOTED = re.compile(r"「[^」]*」|“[^”]*”")
SPLIT_SYNONYMS = re.compile(r"\s*[、，,;；]\s*")
NONE_MARKS = {"", "-", "—", "–", "无"}


@dataclass(frozen=True)
class Entry:
    """One row of the glossary."""

    english: str
    preferred: str
    synonyms: tuple[str, ...]
    where: tuple[str, ...]

    @property
    def later(self) -> bool:
        """True when the term waits for notebook 09 (its where column says ``(09)``)."""
        return LATER in self.where


@dataclass(frozen=True)
class Use:
    """A synonym written where the glossary prefers another term."""

    source: str
    line: int
    synonym: str
    preferred: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.synonym} -> {self.preferred}"


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _is_row(line: str) -> bool:
    return line.lstrip().startswith("|") and not re.fullmatch(r"\s*\|[\s:|-]*\|\s*", line)


def _entry(cells: list[str]) -> Entry:
    english, preferred, synonyms, where = (cells + [""] * 4)[:4]
    names = [] if synonyms in NONE_MARKS else SPLIT_SYNONYMS.split(synonyms)
    marks = re.findall(r"\(\d\d\)|\d\d", where)
    return Entry(english, preferred, tuple(s for s in names if s), tuple(marks))


def parse(text: str) -> list[Entry]:
    """The entries of the first markdown table whose header starts with ``English``."""
    rows = [_cells(line) for line in text.splitlines() if _is_row(line)]
    header = next((i for i, cells in enumerate(rows) if cells[0].lower() == "english"), None)
    if header is None:
        return []
    return [_entry(cells) for cells in rows[header + 1 :]]


def load(path: Path = GLOSSARY) -> list[Entry]:
    """The glossary's entries."""
    return parse(Path(path).read_text(encoding="utf-8"))


def _notebooks(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _notebook_text(path: Path, cell_type: str) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ("".join(c["source"]) for c in cells if c["cell_type"] == cell_type)
    return "\n\n".join(sources)


def _docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *ast.walk(tree)]
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in nodes if isinstance(n, kinds))
    return "\n\n".join(dict.fromkeys(d for d in docs if d))


def course_text(kind: str, root: Path = ROOT) -> dict[str, str]:
    """The course's own text of one kind, by file (relative path): one of :data:`KINDS`."""
    root = Path(root)
    if kind in ("markdown", "code"):
        return {f"notebooks/{p.name}": _notebook_text(p, kind) for p in _notebooks(root)}
    if kind == "readme":
        readme = root / "README.md"
        return {"README.md": readme.read_text(encoding="utf-8")} if readme.exists() else {}
    if kind == "docstrings":
        paths = sorted((root / "bnlab").rglob("*.py"))
        own = Path(__file__).resolve()
        return {str(p.relative_to(root)): _docstrings(p) for p in paths if p.resolve() != own}
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def all_course_text(root: Path = ROOT) -> dict[str, str]:
    """Every kind of :func:`course_text`, keyed ``kind:file``."""
    return {f"{k}:{name}": t for k in KINDS for name, t in course_text(k, root).items()}


def chinese_prose(root: Path = ROOT) -> dict[str, str]:
    """The text where the course writes Chinese prose: notebooks' markdown and the README."""
    return {**course_text("markdown", root), **course_text("readme", root)}


def has_notebook_09(root: Path = ROOT) -> bool:
    return any((Path(root) / "notebooks").glob("09_*.ipynb"))


def mentions(term: str, text: str) -> bool:
    """Whether ``text`` writes ``term``: case-insensitive, not mid-word; a space in ``term``
    matches any whitespace or a hyphen ("memory bandwidth" in "the memory-bandwidth limit")."""
    words = (re.escape(w) for w in term.split())
    pattern = r"(?<![A-Za-z0-9])" + r"[\s-]+".join(words)
    return re.search(pattern, text, re.IGNORECASE) is not None


def missing_terms(
    entries: list[Entry], texts: dict[str, str], notebook_09: bool = False
) -> list[Entry]:
    """Entries whose English term none of ``texts`` writes (``(09)`` ones only with 09)."""
    checked = [e for e in entries if notebook_09 or not e.later]
    return [e for e in checked if not any(mentions(e.english, t) for t in texts.values())]


def unquoted(text: str) -> str:
    """``text`` with quotations blanked: ``> `` lines, 「...」 and “...” (lines kept)."""
    lines = ("" if line.lstrip().startswith(">") else line for line in text.splitlines())
    return QUOTED.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), "\n".join(lines))


def _spans(term: str, line: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(re.escape(term), line)]


def _covered(span: tuple[int, int], covers: list[tuple[int, int]]) -> bool:
    return any(a <= span[0] and span[1] <= b for a, b in covers)


def _line_uses(line: str, entries: list[Entry], preferred: list[str]) -> list[tuple[str, str]]:
    """(synonym, preferred) for each synonym in ``line`` not inside a preferred term."""
    covers = [s for p in preferred for s in _spans(p, line)]
    found = []
    for entry in entries:
        for synonym in entry.synonyms:
            spans = _spans(synonym, line) if CJK.search(synonym) else []
            if any(not _covered(s, covers) for s in spans):
                found.append((synonym, entry.preferred))
    return found


def synonym_uses(entries: list[Entry], texts: dict[str, str]) -> list[Use]:
    """Every Chinese synonym the texts write outside quotations, where a term is preferred."""
    preferred = [e.preferred for e in entries]
    uses = []
    for source, text in texts.items():
        for number, line in enumerate(unquoted(text).splitlines(), start=1):
            if CJK.search(line):
                found = _line_uses(line, entries, preferred)
                uses += [Use(source, number, s, p) for s, p in found]
    return uses


def conflicts(entries: list[Entry]) -> set[str]:
    """Chinese terms that are preferred in one entry and a synonym in another."""
    preferred = {e.preferred for e in entries}
    return {s for e in entries for s in e.synonyms if s in preferred and s != e.preferred}


def main() -> int:
    entries = load()
    missing = missing_terms(entries, all_course_text(), has_notebook_09())
    uses = synonym_uses(entries, chinese_prose())
    print(f"{len(entries)} entries in {GLOSSARY.relative_to(ROOT)}")
    for entry in missing:
        print(f"not in the course: {entry.english}")
    for use in uses:
        print(f"synonym in prose: {use}")
    return 1 if missing or uses else 0


if __name__ == "__main__":
    sys.exit(main())
