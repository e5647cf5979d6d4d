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

In a notebook, :func:`record` also shows ``[result] <key> = <text>`` once, so the stored
output carries each figure next to the cell that measured it; the figure's value travels
in that output's metadata (``bnlab.result``), so tests compare values as well as texts.

Beside the figures, ``"notebooks"`` holds, for each notebook's last full run, the hash of
its code cells (:func:`code_hash`) and how long each of its sections took: a test then
fails when a notebook's code changed after its outputs were stored.

Writing survives crashes and concurrent runs. Every change holds an exclusive lock
(``fcntl.flock`` on ``results/.results.json.lock``) from load to save, and the new store is
written to a temporary file beside it, then moved over it (``os.replace``): a reader, or a
run killed at any moment, sees the old store or the new one, never part of one. A run's
figures reach the store together at its end: ``make notebooks`` gives each notebook a
pending file (``BNLAB_RECORD_PENDING``) that :func:`record` appends to, and commits it only
after the notebook ran without error (``python -m bnlab.teaching.results commit``);
``make bench`` does the same in its own process (:func:`recorded_together`). A failed run
leaves the store as it was. Without a pending file (a notebook run by hand with
``BNLAB_RECORD=1``) each figure is written as it is recorded.

Serves every notebook and ``make bench`` (`make test` checks the README against it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bnlab.config import fast_mode

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "results" / "results.json"
README = ROOT / "README.md"
RECORD_ENV = "BNLAB_RECORD"
PENDING_ENV = "BNLAB_RECORD_PENDING"  # a run's pending file: record appends, commit stores
SCHEMA = 1
RESULT_LINE = re.compile(r"^\[result\] (\S+) = (.*)$", re.M)
RESULT_META = "bnlab.result"  # output metadata key: {"key": ..., "value": ...}
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
           source: str | None = None, path: Path = STORE) -> None:  # fmt: skip
    """Record one headline figure and show it as ``[result] key = text``.

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
    _show(key, shown, value)
    if recording():
        entry = figure_entry(value, what, shown, table, source or _source_of(key))
        pending = os.environ.get(PENDING_ENV)
        if pending:  # a run that commits its figures together at its end
            with open(pending, "a", encoding="utf-8") as f:
                f.write(json.dumps([key, entry], ensure_ascii=False) + "\n")
        else:
            write_figures({key: entry}, path)


def _jsonable(value):
    """The value as the store keeps it (a JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(value))


def _show(key: str, text: str, value) -> None:
    """Show ``[result] key = text`` once: in a notebook with the value in the output's
    metadata (what the store's tests compare), elsewhere as a printed line."""
    line = f"[result] {key} = {text}"
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the course extra
        get_ipython = None
    shell = get_ipython() if get_ipython else None
    if shell is None or not hasattr(shell, "kernel"):
        print(line)
        return
    from IPython.display import display

    meta = {RESULT_META: {"key": key, "value": _jsonable(value)}}
    display({"text/plain": line}, raw=True, metadata=meta)


# ------------------------------------------------------------------ writing the store

_IN_PROCESS = threading.RLock()  # flock does not order the threads of one process
_HELD: set[str] = set()  # lock files this process holds: nested updates do not wait on themselves


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the store's exclusive lock (re-entrant within this process).

    ``flock`` on a lock file beside the store, not on the store itself, which os.replace
    swaps for a new file; the kernel drops the lock when its holder exits or is killed.
    """
    import fcntl  # POSIX only; imported here so that reading the store needs none of it

    lock = os.path.abspath(path.with_name(f".{path.name}.lock"))
    with _IN_PROCESS:
        if lock in _HELD:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            _HELD.add(lock)
            try:
                yield
            finally:
                _HELD.discard(lock)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then move it over ``path``.

    Called under the lock, so any temporary file already there is a killed writer's.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, mode)  # mkstemp creates 0600; keep the store readable as it was
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(data: dict, path: Path = STORE) -> None:
    """Write the store whole (see the module docstring): sorted keys, one figure per block,
    UTF-8 kept readable; under the lock, through a temporary file and ``os.replace``."""
    text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    with _locked(path):
        _replace(path, text)


@contextmanager
def updating(path: Path = STORE) -> Iterator[dict]:
    """The store, loaded under the lock and saved when the block ends without an error.

    The lock is held from load to save, so a concurrent writer's figures are never lost;
    an exception inside the block leaves the file as it was.
    """
    with _locked(path):
        data = load(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            save(data, path)


def figure_entry(value, what: str, text: str, table: str, source: str) -> dict:
    """One figure as the store keeps it (see the schema in the module docstring)."""
    return {
        "table": table,
        "what": what,
        "text": text,
        "value": value,
        "source": source,
        "recorded": datetime.date.today().isoformat(),
    }


def write_figures(
    figures: dict[str, dict], path: Path = STORE, replace_source: str | None = None
) -> list[str]:
    """Add or replace figures (``key -> figure``) in one locked update.

    replace_source: also drop that source's figures that are not among ``figures`` (a run
    that replaces its whole set). Returns the keys dropped.
    """
    with updating(path) as data:
        gone = [
            k
            for k, f in data["figures"].items()
            if replace_source is not None and f["source"] == replace_source and k not in figures
        ]
        for key in gone:
            del data["figures"][key]
        data["figures"].update(figures)
    return gone


def write_figure(key: str, value, what: str, text: str, table: str, source: str,
                 path: Path = STORE) -> None:  # fmt: skip
    """Add or replace one figure in the store (callers decide whether this run records)."""
    write_figures({key: figure_entry(value, what, text, table, source)}, path)


def read_pending(pending: Path) -> dict[str, dict]:
    """``key -> figure`` of a run's pending file (JSON lines ``[key, figure]``, later wins).

    A missing file is a run that recorded nothing; a line that does not parse raises
    ValueError naming the file (a writer killed mid-line: that run must not be committed).
    """
    if not pending.is_file():
        return {}
    figures = {}
    for number, line in enumerate(pending.read_text(encoding="utf-8").splitlines(), 1):
        try:
            key, figure = json.loads(line)
        except ValueError as err:
            raise ValueError(
                f"{pending}, line {number}, is not a recorded figure ({err}); the run that wrote "
                "it did not finish: run it again rather than commit it"
            ) from err
        figures[key] = figure
    return figures


def commit(pending: Path, source: str, path: Path = STORE) -> list[str]:
    """Store a finished run's figures at once, as the whole set of ``source``; delete ``pending``.

    pending: the file :func:`record` appended to during the run (``BNLAB_RECORD_PENDING``);
    source: the run's notebook stem (``"05_lenet"``) or ``"bench"``. Figures of ``source``
    that the run did not record are dropped (returned): no figure outlives what measured it.
    """
    gone = write_figures(read_pending(pending), path, replace_source=source)
    pending.unlink(missing_ok=True)
    return gone


@contextmanager
def recorded_together(source: str, path: Path = STORE) -> Iterator[None]:
    """Figures recorded inside the block reach the store together when it ends.

    They replace every figure of ``source`` (see :func:`commit`); when the block raises, the
    store stays as it was. Does nothing special unless this run records (:func:`recording`).
    """
    if not recording():
        yield
        return
    fd, name = tempfile.mkstemp(prefix="bnlab-results-", suffix=".jsonl")
    os.close(fd)
    previous = os.environ.get(PENDING_ENV)
    os.environ[PENDING_ENV] = name
    try:
        yield
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    finally:
        if previous is None:
            os.environ.pop(PENDING_ENV, None)
        else:
            os.environ[PENDING_ENV] = previous
    commit(Path(name), source, path)


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


def result_outputs(path: Path) -> list[tuple[str, str, object]]:
    """``(key, text, value)`` of every ``[result]`` output in a notebook, in order.

    value is what the output's metadata carries (``None`` for a printed line, which has no
    metadata). A key that appears twice appears twice here (:func:`notebook_results`
    would keep only the last).
    """
    found = []
    for cell in json.loads(path.read_text())["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text = "".join(output.get("text", ""))
                found += [(k, t, None) for k, t in RESULT_LINE.findall(text)]
                continue
            meta = output.get("metadata", {}).get(RESULT_META)
            text = "".join(output.get("data", {}).get("text/plain", ""))
            for k, t in RESULT_LINE.findall(text):
                found.append((k, t, meta["value"] if meta and meta["key"] == k else None))
    return found


def notebook_results(path: Path) -> dict[str, str]:
    """``key -> text`` of every ``[result]`` line in a notebook's stored outputs."""
    return {key: text for key, text, _ in result_outputs(path)}


def code_hash(notebook: Path | dict) -> str:
    """SHA-256 of a notebook's code cells (sources only, in order): what its outputs ran."""
    nb = json.loads(Path(notebook).read_text()) if isinstance(notebook, (str, Path)) else notebook
    code = [
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        for c in nb["cells"]
        if c["cell_type"] == "code"
    ]
    return hashlib.sha256("\n\0\n".join(code).encode()).hexdigest()


def section_seconds(notebook: Path | dict) -> dict[str, float]:
    """Seconds each ``## `` section's code cells took in the stored run (from the execution
    timestamps nbclient writes into each cell's metadata); ``"(top)"`` before the first."""
    nb = json.loads(Path(notebook).read_text()) if isinstance(notebook, (str, Path)) else notebook
    sections: dict[str, float] = {}
    current = "(top)"
    for cell in nb["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        heading = re.search(r"^## (.+)$", source, re.M) if cell["cell_type"] == "markdown" else None
        if heading:
            current = heading.group(1).strip()
        times = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in times and "shell.execute_reply" in times:
            start, end = (
                datetime.datetime.fromisoformat(times[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            sections[current] = sections.get(current, 0.0) + (end - start).total_seconds()
    return sections


def write_run(notebook: Path, path: Path = STORE) -> dict:
    """Record a just-executed notebook's code hash and section times in the store."""
    entry = {
        "code": code_hash(notebook),
        "sections": {k: round(v, 1) for k, v in section_seconds(notebook).items()},
        "recorded": datetime.date.today().isoformat(),
    }
    with updating(path) as data:
        data.setdefault("notebooks", {})[Path(notebook).stem] = entry
    return entry


def drop_source(source: str, path: Path = STORE) -> list[str]:
    """Remove every figure of ``source``, only while recording; returns the keys removed.

    A run that replaces its whole set commits it instead (:func:`recorded_together`).
    """
    if not recording():
        return []
    with updating(path) as data:
        gone = [k for k, f in data["figures"].items() if f["source"] == source]
        for key in gone:
            del data["figures"][key]
    return gone


def prune(notebooks: list[Path], path: Path = STORE) -> list[str]:
    """Drop the figures of these just-executed notebooks that their outputs no longer show."""
    shown = {notebook.stem: notebook_results(notebook) for notebook in notebooks}
    with updating(path) as data:
        stale = [
            k
            for k, f in data["figures"].items()
            if f["source"] in shown and k not in shown[f["source"]]
        ]
        for key in stale:
            del data["figures"][key]
    return stale


def _cli_commit(args, parser) -> None:
    if len(args.args) != 1 or not args.source:
        parser.error("commit takes one pending file and --source (e.g. --source 05_lenet)")
    for key in commit(Path(args.args[0]), args.source, args.store):
        print(f"dropped {key}: {args.source} no longer records it")


def _cli_run(args, _parser) -> None:
    for notebook in args.args:
        write_run(Path(notebook), args.store)


def _cli_sections(args, _parser) -> None:
    for notebook in args.args:
        for name, seconds in section_seconds(Path(notebook)).items():
            print(f"{Path(notebook).stem}  {duration(seconds):>12}  {name}")


def _cli_prune(args, _parser) -> None:
    for key in prune([Path(a) for a in args.args], args.store):
        print(f"dropped {key}: its notebook no longer records it")


def _cli_notebook_time(args, _parser) -> None:
    notebook, seconds = Path(args.args[0]), float(args.args[1])
    what = f"`make notebooks`: {notebook.stem} in full mode"
    key = f"timing.notebook.{notebook.stem}"
    write_figure(key, seconds, what, duration(seconds), "timings", "timings", args.store)


def _cli_readme(_args, _parser) -> None:
    changed = write_readme()
    state = "regenerated from" if changed else "already match"
    print(f"README.md results {state} {STORE.relative_to(ROOT)}")


def _cli_show(_args, _parser) -> None:
    print(render(load()))


COMMANDS = {
    "readme": _cli_readme,
    "show": _cli_show,
    "notebook-time": _cli_notebook_time,
    "prune": _cli_prune,
    "commit": _cli_commit,
    "run": _cli_run,
    "sections": _cli_sections,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.teaching.results", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument(
        "args",
        nargs="*",
        help="notebook-time: a notebook and its seconds; prune, run, sections: notebooks; "
        "commit: a pending file",
    )
    parser.add_argument("--source", help="commit: the run's notebook stem, or bench")
    parser.add_argument(
        "--store",
        type=Path,
        default=STORE,
        help="commit, prune, notebook-time, run: the store to write",
    )
    args = parser.parse_args(argv)
    COMMANDS[args.command](args, parser)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
