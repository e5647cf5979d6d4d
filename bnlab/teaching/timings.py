"""How long the course's commands take, measured from a fresh clone: ``make timings``.

Clones this repository's committed state into a temporary folder, runs the README's
commands there one after the other (``make setup``, ``make data``, ``make test``,
``make test-deep``, ``make test-browser``, ``make bench``), times each, reads the test
counts from pytest's summary lines and the size of what setup installed, and writes every
figure to the results store (table ``timings``, source ``timings``). The README's
"How long things take" block is generated from those entries, and so is the line that
names the machine; ``make notebooks`` adds each notebook's full-run time.

Serves the README (its timings block); no notebook.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bnlab.teaching import results

STEPS = {  # make target -> the README row's label
    "setup": "`make setup` (first `make lab` / `make test`): `.venv` from the package index",
    "data": "Fashion-MNIST (`make data`)",
    "test": "`make test` after setup",
    "test-deep": "`make test-deep`: property-based tests at 3000 examples each",
    "test-browser": "`make test-browser` (JupyterLab in headless Chromium)",
    "bench": "`make bench`",
}
OUTER_MAKE = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
PASSED = re.compile(r"(\d+) passed")
SIZE_GROUPS = {"torch": ["torch"], "CUDA libraries": ["nvidia"], "triton": ["triton"]}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if names:
            return names[0].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """This machine in a few words: CPU model, cores, memory, GPU or none."""
    model = cpu_model()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "a GPU" if shutil.which("nvidia-smi") else "no GPU"
    return f"{os.cpu_count()} cores of {model}, {memory:.0f} GiB, {gpu}"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def venv_sizes(venv: Path) -> dict[str, int]:
    """Bytes of the whole environment and of its largest package groups."""
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = {"total": _tree_bytes(venv)}
    for group, prefixes in SIZE_GROUPS.items():
        dirs = [d for d in site.iterdir() if d.is_dir() and d.name.split("_")[0] in prefixes]
        sizes[group] = sum(_tree_bytes(d) for d in dirs)
    return sizes


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def run_step(clone: Path, target: str) -> tuple[float, str]:
    """Seconds and combined output of ``make <target>`` in the clone; raises if it fails."""
    # a fresh shell's environment: no CI flag, and none of an outer make's variables (under
    # `make timings` they would make the inner make print "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE} | {"CI": ""}
    start = time.perf_counter()
    done = subprocess.run(["make", target], cwd=clone, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"make {target} failed in {clone}:\n{output[-3000:]}")
    return seconds, output


def describe(target: str, seconds: float, output: str, clone: Path) -> str:
    """The README's text for one step: its time, and what it did where that is known."""
    text = results.duration(seconds)
    counts = [int(n) for n in PASSED.findall(output)]
    if target == "setup":
        sizes = venv_sizes(clone / ".venv")
        parts = ", ".join(f"{name} {_gb(sizes[name])}" for name in SIZE_GROUPS)
        text += f"; {_gb(sizes['total'])} installed ({parts})"
    elif target == "test" and len(counts) >= 2:
        text += f": {counts[0]} unit tests, then {counts[1]} notebook cells in FAST mode"
    elif target == "test-deep" and counts:
        text += f": {counts[0]} tests"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.teaching.timings", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=list(STEPS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnlab-timings-") as tmp:
        clone = Path(tmp) / "bnlab"
        subprocess.run(["git", "clone", "-q", str(results.ROOT), str(clone)], check=True)
        measured = {}  # written only when every step has passed, so the store stays whole
        for target in args.steps:
            print(f"make {target} ...", flush=True)
            seconds, output = run_step(clone, target)
            text = describe(target, seconds, output, clone)
            print(f"  {text}", flush=True)
            measured[f"timing.{list(STEPS).index(target)}-{target}"] = (seconds, target, text)
    figures = {
        key: results.figure_entry(round(seconds), STEPS[target], text, "timings", "timings")
        for key, (seconds, target, text) in measured.items()
    }
    about = f"measured from a fresh clone on {machine()}"
    figures["timing.0-machine"] = results.figure_entry(
        machine(), "machine", about, "timings", "timings"
    )
    results.write_figures(figures)  # one update: all of this run's timings, or none
    results.write_readme()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
