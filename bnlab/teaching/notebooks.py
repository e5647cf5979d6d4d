"""The course's committed notebooks: the metadata JupyterLab writes, trust, clean outputs.

A learner opens the committed notebooks in JupyterLab before running anything, and a
reader without a kernel (GitHub, nbviewer) sees only what is stored. Three things decide
what they see, and this module owns all three:

- **Metadata.** On opening, JupyterLab starts the kernel and copies its kernelspec and
  ``language_info`` into the notebook; any difference from the stored values marks the
  notebook modified. :func:`expected_metadata` asks the installed ipykernel what it writes
  (never a hard-coded copy) and :func:`normalize` stores exactly that.
- **Trust.** JupyterLab renders widget views (dashboards, progress bars) from the saved
  widget state only in notebooks the user trusts; untrusted ones show the widgets' text
  form. :func:`trust` signs the course's own notebooks, as ``jupyter trust`` does.
- **Clean outputs.** :func:`output_problems` lists what must never be stored: stderr,
  errors, numpy reprs such as ``np.float64(0.107)``, float noise such as
  ``0.09999999999999999``, a widget's raw text form, an unfinished progress bar, saved widget
  state that no output shows (a kernel saves every model it made; :func:`normalize` drops it).

``python -m bnlab.teaching.notebooks normalize|trust|check [NOTEBOOK ...]`` runs them from the
Makefile; ``reading-time`` prints each notebook's main-path and deep-dive minutes
(:mod:`bnlab.teaching.path`). ``make notebooks`` normalizes and signs; ``make setup`` and
``make lab`` sign.

Serves every notebook (`make test`).
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PROGRESS_MODELS = ("FloatProgressModel", "IntProgressModel")
BAR_WIDTH = 10  # tqdm's bar in a widget's text form: ten cells

# What no stored output may contain, with the reason the check gives.
NOISE = [
    (re.compile(r"\bnp\.(?:float|int|uint|bool|complex|str)\w*\("), "a numpy repr"),
    (re.compile(r"\d\.\d*?(?:0{6,}[1-9]|9{6,}\d)"), "float noise (format the number)"),
    (re.compile(r"\b[HV]Box\(children="), "a widget's raw text form"),
]


def course_notebooks() -> list[Path]:
    """The ordered course notebooks, ``notebooks/NN_topic.ipynb``."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def expected_metadata() -> dict[str, dict[str, Any]]:
    """The ``kernelspec`` and ``language_info`` that JupyterLab stores with this environment.

    Both come from the installed packages: the kernelspec from jupyter_client's view of the
    ``python3`` kernel (ipykernel's), ``language_info`` from ipykernel's own kernel_info.
    """
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    kernelspec = {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
    return {"kernelspec": kernelspec, "language_info": dict(IPythonKernel.language_info)}


def metadata_differences(nb: dict) -> list[str]:
    """Where the notebook's kernelspec / language_info differ from :func:`expected_metadata`."""
    found = []
    for key, want in expected_metadata().items():
        have = nb.get("metadata", {}).get(key)
        if have != want:
            found.append(f"metadata.{key} is {have!r}, the installed ipykernel writes {want!r}")
    return found


def widget_state(nb: dict) -> dict[str, dict]:
    """model id -> saved model (``model_name``, ``state``); empty when none is saved."""
    return nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def progress_text(state: dict[str, dict], model_id: str) -> str | None:
    """The text form of a finished tqdm bar (``desc: 100%|██████████| 3/3 [..]``), or None.

    tqdm's notebook bar is an HBox of (HTML prefix, progress bar, HTML suffix); its text form
    is stored when the bar is first displayed, at 0 %. Rebuilt from the saved state, it
    shows what the run did to readers without widget support.
    """
    box = state.get(model_id, {})
    children = [
        state.get(ref.removeprefix("IPY_MODEL_"), {})
        for ref in box.get("state", {}).get("children", [])
    ]
    names = [child.get("model_name") for child in children]
    if (
        box.get("model_name") != "HBoxModel"
        or len(children) != 3
        or names[1] not in PROGRESS_MODELS
    ):
        return None
    left, bar, right = (child["state"] for child in children)
    filled = round(BAR_WIDTH * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
    cells = "█" * filled + " " * (BAR_WIDTH - filled)
    return f"{html.unescape(left.get('value', ''))}|{cells}|{html.unescape(right.get('value', ''))}"


def _shown_models(nb: dict, state: dict[str, dict]) -> set[str]:
    """The saved models an output shows, with every model they reference (children, layouts)."""
    todo = [
        output["data"][WIDGET_VIEW]["model_id"]
        for cell in nb.get("cells", [])
        for output in cell.get("outputs", [])
        if WIDGET_VIEW in output.get("data", {})
    ]
    shown: set[str] = set()
    while todo:
        model_id = todo.pop()
        if model_id in shown or model_id not in state:
            continue
        shown.add(model_id)
        todo.extend(re.findall(r"IPY_MODEL_([\w-]+)", json.dumps(state[model_id])))
    return shown


def normalize(nb: dict) -> dict:
    """Store the installed ipykernel's metadata and finished progress-bar text, and drop the
    saved widget models no output shows (a kernel saves every model it ever made), in place."""
    nb.setdefault("metadata", {}).update(expected_metadata())
    state = widget_state(nb)
    for model_id in set(state) - _shown_models(nb, state):
        del state[model_id]
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = progress_text(state, view["model_id"]) if view else None
            if text is not None:
                output["data"]["text/plain"] = text
    return nb


def output_texts(output: dict) -> list[str]:
    """Every text a reader can see in one output: stream text and each text/* form."""
    if output.get("output_type") == "stream":
        return ["".join(output.get("text", ""))]
    data = output.get("data", {})
    return ["".join(value) for mime, value in data.items() if mime.startswith("text/")]


def output_problems(nb: dict) -> list[str]:
    """What is wrong with the stored outputs, one line each (empty: clean)."""
    state = widget_state(nb)
    code_cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    counts = [c.get("execution_count") for c in code_cells]
    problems = []
    if counts != list(range(1, len(code_cells) + 1)):
        problems.append(f"execution counts are {counts}, not 1..{len(code_cells)} in order")
    for index, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            problems += [f"cell {index}: {p}" for p in _one_output_problems(output, state)]
    for model_id in state:
        problems += _saved_widget_problems(state, model_id)
    stale = set(state) - _shown_models(nb, state)
    if stale:
        problems.append(
            f"{len(stale)} saved widget model(s) that no output shows (stale widget state, e.g. "
            f"{sorted(stale)[0][:8]}); run `python -m bnlab.teaching.notebooks normalize`"
        )
    return problems


def _noise(text: str) -> list[str]:
    return [f"{why}: {m.group(0)!r}" for pattern, why in NOISE if (m := pattern.search(text))]


def _one_output_problems(output: dict, state: dict[str, dict]) -> list[str]:
    """Problems of one stored output: errors, stderr, noise, widget views without state."""
    found = []
    if output.get("output_type") == "error":
        found.append(f"error output {output.get('ename')}")
    if output.get("name") == "stderr":
        found.append(f"stderr output {''.join(output.get('text', ''))[:120]!r}")
    for text in output_texts(output):
        found += _noise(text)
    view = output.get("data", {}).get(WIDGET_VIEW)
    if view and view["model_id"] not in state:
        found.append("widget view without saved state (a blank box)")
    finished = progress_text(state, view["model_id"]) if view else None
    if finished is not None and "".join(output["data"].get("text/plain", "")) != finished:
        found.append("progress bar text is not the finished bar")
    done = re.search(r"\|\s*(\d+)/(\d+)", finished or "")
    if done and done.group(1) != done.group(2):
        found.append(f"progress bar text stopped at {done.group(1)}/{done.group(2)}")
    return found


def _saved_widget_problems(state: dict[str, dict], model_id: str) -> list[str]:
    """Problems of one saved widget model: unfinished or hidden bars, noise in its value."""
    model, found = state[model_id], []
    values = model["state"]
    if model["model_name"] in PROGRESS_MODELS and values.get("value") != values.get("max"):
        found.append(
            f"progress bar {model_id[:8]} stored at {values.get('value')}/{values.get('max')}"
        )
    layout = state.get(values.get("layout", "").removeprefix("IPY_MODEL_"), {})
    hidden = layout.get("state", {}).get("visibility") == "hidden"
    if hidden and progress_text(state, model_id) is not None:
        found.append(f"progress bar {model_id[:8]} stored hidden (tqdm leave=False)")
    if isinstance(values.get("value"), str):
        found += [f"widget {model_id[:8]}: {p}" for p in _noise(values["value"])]
    return found


def trust_remedy(path: Path) -> str:
    """What a learner does to trust a notebook bnlab would not sign: check it, then sign it."""
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    return f"if you know where it comes from, trust it yourself: `.venv/bin/jupyter trust {shown}`"


def _git(path: Path, *args: str) -> subprocess.CompletedProcess | None:
    """``git -C <path's folder> args... <path's name>``; None when git cannot be run."""
    try:
        return subprocess.run(
            ["git", "-C", str(path.parent), *args, "--", path.name],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def why_not_committed(path: Path) -> str | None:
    """None when git tracks ``path`` and it equals its committed version; else the reason.

    Both questions are needed: ``git diff HEAD`` is silent (exit 0) for a file git does not
    track, so on its own it vouches for any notebook dropped into the folder.
    """
    tracked = _git(path, "ls-files", "--error-unmatch")
    if tracked is None:
        return "git is not available to check that it is the course's own"
    if tracked.returncode != 0:
        if "not a git repository" in tracked.stderr:
            return "not in a git checkout, so bnlab cannot tell it is the course's own"
        return "git does not track it"
    same = _git(path, "diff", "--quiet", "HEAD")
    if same is not None and same.returncode == 0:
        return None
    if same is not None and same.returncode == 1:
        return "it differs from the committed version"
    return "git cannot compare it with a committed version"  # e.g. added, no commit yet


def trust(paths: list[Path], committed_only: bool = True) -> list[Path]:
    """Sign notebooks as trusted for this user (``jupyter trust``); returns those signed.

    With ``committed_only``, only the course's own notebooks are signed: git tracks them and
    they equal their committed version. Trusted notebooks run their saved HTML and
    JavaScript, so anything else (an edited notebook, one dropped into the folder, every
    notebook outside a git checkout) is left for the learner to trust after checking it.
    """
    from nbformat.sign import NotebookNotary

    notary = NotebookNotary()
    signed = []
    for path in paths:
        why = why_not_committed(path) if committed_only else None
        if why is not None:
            print(f"not signing {path.name}: {why}; {trust_remedy(path)}")
            continue
        nb = nbformat.read(path, as_version=4)
        if not notary.check_signature(nb):
            notary.sign(nb)
        signed.append(path)
    return signed


def main(argv: list[str] | None = None) -> int:
    """``python -m bnlab.teaching.notebooks normalize|trust|check [--all] [NOTEBOOK ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bnlab.teaching.notebooks", description=__doc__)
    parser.add_argument("action", choices=["normalize", "trust", "check", "reading-time"])
    parser.add_argument("paths", nargs="*", type=Path, help="default: the course notebooks")
    parser.add_argument("--all", action="store_true", help="trust: sign edited notebooks too")
    parser.add_argument(
        "--readme", action="store_true", help="reading-time: write the minutes into README.md"
    )
    args = parser.parse_intermixed_args(argv)  # `trust --all A B`: paths after the flag
    paths = args.paths or course_notebooks()
    if args.action == "reading-time":
        from bnlab.teaching import path as learner_path

        rows = learner_path.reading_table(paths)
        print(learner_path.format_reading_table(rows))
        if args.readme:
            readme = ROOT / "README.md"
            readme.write_text(learner_path.course_map(readme.read_text(), rows))
        return 0
    if args.action == "trust":
        signed = trust(paths, committed_only=not args.all)
        print(f"trusted {len(signed)} of {len(paths)} notebooks (widgets render from saved state)")
        return 0
    failed = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if args.action == "normalize":
            before = nbformat.writes(nb)
            if nbformat.writes(normalize(nb)) != before:
                nbformat.write(nb, path)
                print(f"normalized {path}")
            continue
        for problem in metadata_differences(nb) + output_problems(nb):
            failed += 1
            print(f"{path.name}: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
