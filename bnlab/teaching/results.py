"""The results store: every headline figure of the course, in one machine-readable file.

Full runs write it, nothing else does: ``make notebooks`` (each notebook's full run) and
``make bench`` set ``BNLAB_RECORD=1``, and :func:`record` adds or replaces a figure only
then, and never in FAST mode. The README's results tables are generated from the store
(``make readme``, run by both), and tests check that the README matches the store and
that the store matches what the notebooks' stored outputs show.

Schema of ``results/results.json`` (version 1)::

    {"schema": 1,
     "figures": {
        "<key>": {"table": "<README table>", "what": "<row label>", "text": "<as shown>",
                  "value": <number, string or list>, "source": "<notebook stem or 'bench'>",
                  "recorded": "<YYYY-MM-DD>"}}}

In a notebook, :func:`record` also prints ``[result] <key> = <text>``, so the stored
output carries each figure next to the cell that measured it.

Serves every notebook and ``make bench`` (`make test` checks the README against it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path

from bnlab.config import fast_mode

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "results" / "results.json"
README = ROOT / "README.md"
RECORD_ENV = "BNLAB_RECORD"
SCHEMA = 1
RESULT_LINE = re.compile(r"^\[result\] (\S+) = (.*)$", re.M)
TABLES = {  # README tables, in order: (title, column heading of the row labels)
    "results": ("Headline figures", "what"),
    "pitfalls": ("Pitfalls (notebook 06)", "pitfall: symptom measured, and after the fix"),
    "claims": ("Claims (notebook 08, and the new lessons' verdicts)", "claim"),
    "errata": ("Errata of the five seed posts (notebook 10)", "what"),
    "bench": ("BatchNorm kernels vs torch, CPU (make bench; notebook 04)", "case"),
    "timings": ("How long things take", "step"),
}
BLOCKS = {  # README marker -> the tables generated between <!-- name --> and <!-- /name -->
    "results": ("results", "pitfalls", "claims", "errata", "bench"),
    "timings": ("timings",),
}
MEASURED_OUTSIDE_NOTEBOOKS = ("bench", "timings")  # sources that no notebook output shows


def load(path: Path = STORE) -> dict:
    """The store as a dict; an empty store when the file does not exist yet."""
    if not path.is_file():
        return {"schema": SCHEMA, "figures": {}}
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} has schema {data.get('schema')!r}; this bnlab reads {SCHEMA}")
    return data


def recording() -> bool:
    """Whether figures go to the store now: a full run started by make (BNLAB_RECORD=1)."""
    return os.environ.get(RECORD_ENV) == "1" and not fast_mode()


def record(key: str, value, what: str, text: str | None = None, table: str = "results",
           source: str | None = None, path: Path = STORE) -> str:  # fmt: skip
    """Record one headline figure; returns (and prints) the text shown for it.

    key: unique, dotted (``"05.classic.bn"``); value: a number, string, list or dict; what:
    the row label in the README; text: how the value reads (default ``str(value)``);
    table: one of :data:`TABLES`; source: the notebook stem or "bench" (default: the
    key's first part, e.g. ``"05"`` is looked up as ``notebooks/05_*.ipynb``).
    """
    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)} (got {table!r})")
    if not re.fullmatch(r"[\w.\-]+", key):
        raise ValueError(f"key must be letters, digits, '_', '-' and '.' (got {key!r})")
    shown = str(value) if text is None else text
    if "\n" in shown:
        raise ValueError("a recorded text must fit on one line")
    print(f"[result] {key} = {shown}")
    if recording():
        write_figure(key, value, what, shown, table, source or _source_of(key), path)
    return shown


def save(data: dict, path: Path = STORE) -> None:
    """Write the store: sorted keys, one figure per block, UTF-8 kept readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def write_figure(key: str, value, what: str, text: str, table: str, source: str,
                 path: Path = STORE) -> None:  # fmt: skip
    """Add or replace one figure in the store (callers decide whether this run records)."""
    data = load(path)
    data["figures"][key] = {
        "table": table,
        "what": what,
        "text": text,
        "value": value,
        "source": source,
        "recorded": datetime.date.today().isoformat(),
    }
    save(data, path)


def duration(seconds: float) -> str:
    """``95`` -> ``"1 min 35 s"``: how the README states a time."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _source_of(key: str) -> str:
    prefix = key.split(".", 1)[0]
    if prefix == "bench":
        return "bench"
    found = sorted((ROOT / "notebooks").glob(f"{prefix}_*.ipynb"))
    return found[0].stem if found else prefix


def render(data: dict, block: str = "results") -> str:
    """One README block (see :data:`BLOCKS`): a markdown table per table name, rows in key order."""
    blocks = []
    for table in BLOCKS[block]:
        title, label = TABLES[table]
        rows = sorted((k, f) for k, f in data["figures"].items() if f["table"] == table)
        if not rows:
            continue
        lines = [f"#### {title}", "", f"| {label} | measured | source |", "| --- | --- | --- |"]
        for _key, f in rows:
            cells = (f["what"], f["text"], f["source"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def readme_block(text: str, block: str = "results") -> str:
    """A generated part of the README, between its ``<!-- block -->`` markers."""
    match = re.search(rf"<!-- {block} -->\n(.*?)<!-- /{block} -->", text, re.S)
    if not match:
        raise ValueError(f"README.md has no <!-- {block} --> ... <!-- /{block} --> block")
    return match.group(1).strip()


def write_readme(data: dict | None = None, path: Path = README) -> bool:
    """Regenerate the README's generated blocks from the store; whether the file changed."""
    text = new = path.read_text()
    data = load() if data is None else data
    for block in BLOCKS:
        if f"<!-- {block} -->" not in new:
            continue
        generated = render(data, block)
        new = re.sub(
            rf"<!-- {block} -->\n.*?<!-- /{block} -->",
            lambda _m, b=block, g=generated: f"<!-- {b} -->\n{g}\n<!-- /{b} -->",
            new,
            flags=re.S,
        )
    if new != text:
        path.write_text(new)
    return new != text


def notebook_results(path: Path) -> dict[str, str]:
    """``key -> text`` of every ``[result]`` line in a notebook's stored outputs."""
    found = {}
    for cell in json.loads(path.read_text())["cells"]:
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            found.update(RESULT_LINE.findall("".join(text) if isinstance(text, list) else text))
    return found


def drop_source(source: str, path: Path = STORE) -> list[str]:
    """Remove every figure of ``source`` (e.g. "bench" before a full benchmark run records
    its new set), only while recording; returns the keys removed."""
    if not recording():
        return []
    data = load(path)
    gone = [k for k, f in data["figures"].items() if f["source"] == source]
    for key in gone:
        del data["figures"][key]
    if gone:
        save(data, path)
    return gone


def prune(notebooks: list[Path], path: Path = STORE) -> list[str]:
    """Drop the figures of these just-executed notebooks that their outputs no longer show."""
    data = load(path)
    stale = []
    for notebook in notebooks:
        shown = notebook_results(notebook)
        stale += [
            k for k, f in data["figures"].items() if f["source"] == notebook.stem and k not in shown
        ]
    for key in stale:
        del data["figures"][key]
    if stale:
        save(data, path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.teaching.results", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["readme", "show", "notebook-time", "prune"])
    parser.add_argument(
        "args", nargs="*", help="notebook-time: a notebook and its seconds; prune: notebooks"
    )
    args = parser.parse_args(argv)
    if args.command == "prune":
        for key in prune([Path(a) for a in args.args]):
            print(f"dropped {key}: its notebook no longer records it")
    elif args.command == "notebook-time":
        notebook, seconds = Path(args.args[0]), float(args.args[1])
        what = f"`make notebooks`: {notebook.stem} in full mode"
        key = f"timing.notebook.{notebook.stem}"
        write_figure(key, seconds, what, duration(seconds), "timings", "timings")
    elif args.command == "readme":
        changed = write_readme()
        print(
            "README.md results "
            + ("regenerated from" if changed else "already match")
            + f" {STORE.relative_to(ROOT)}"
        )
    else:
        print(render(load()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
