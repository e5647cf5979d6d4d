"""The project's own files agree with each other: pyproject, environment.yml, Makefile."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement(spec: str) -> tuple[str, str]:
    """Split 'numba-cuda[cu13]>=0.10' into ('numba-cuda[cu13]', '>=0.10'), name normalized."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)\s*(.*)$", spec)
    assert match, spec
    name, version = match.groups()
    return name.lower().replace("_", "-"), version.replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    specs = meta["dependencies"] + extras["course"] + extras["dev"] + extras["site"]
    return dict(requirement(s) for s in specs)


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    found: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            found.update(requirement(s) for s in dep["pip"] if not s.startswith("-e"))
        elif not dep.startswith(("python=", "pip")):
            found.update([requirement(dep)])
    return found


def test_environment_yml_agrees_with_pyproject():
    ours, conda = pyproject_requirements(), conda_requirements()
    assert set(conda) == set(ours), (
        f"only in environment.yml: {sorted(set(conda) - set(ours))}; "
        f"only in pyproject.toml: {sorted(set(ours) - set(conda))}"
    )
    for name, version in ours.items():
        assert conda[name] == version, f"{name}: pyproject says {version!r}, conda {conda[name]!r}"


def test_gpu_extra_is_numba_cuda_cu13():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [requirement(s)[0] for s in meta["optional-dependencies"]["gpu"]] == ["numba-cuda[cu13]"]


def as_tuple(version: str) -> tuple[int, ...]:
    """'2.14.1+cpu' -> (2, 14, 1)."""
    return tuple(int(x) for x in version.split("+")[0].split("."))


def test_torch_pins_in_makefile_satisfy_pyproject():
    """The Makefile's torch pair must satisfy pyproject's ranges and stay <= 2.14.1."""
    pins = re.search(r"^TORCH_PKGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    versions = dict(p.split("==") for p in pins.split())
    assert as_tuple(versions["torch"]) <= (2, 14, 1)
    assert as_tuple(versions["torchvision"]) <= (0, 29, 1)
    ours = pyproject_requirements()
    assert as_tuple(versions["torch"]) >= as_tuple(ours["torch"].removeprefix(">="))
    assert as_tuple(versions["torchvision"]) >= as_tuple(ours["torchvision"].removeprefix(">="))


def test_makefile_has_every_target():
    text = (ROOT / "Makefile").read_text()
    targets = (
        "setup",
        "lab",
        "test",
        "test-browser",
        "site",
        "test-site",
        "notebooks",
        "bench",
        "lint",
        "data",
        "clean",
    )
    for target in targets:
        assert re.search(rf"^{target}:", text, re.M), target


def test_ci_runs_the_readme_commands():
    """CI runs what the README tells a learner to run, and the browser test after it."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^make test-browser$", ci, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "make test " in readme and "make lab " in readme


def test_tests_need_the_data_first():
    """`make test` gets Fashion-MNIST before any test runs (not 56 tracebacks later)."""
    text = (ROOT / "Makefile").read_text()
    for target in ("test-unit", "test-notebooks", "notebooks"):
        assert re.search(rf"^{target}: data\b", text, re.M), target


PACKAGES = ("nn", "kernels", "experiments", "inference", "teaching", "bench", "distributed")
LEARNER_PATHS = {
    "bnlab.functional": "bnlab.nn.functional",
    "bnlab.modules": "bnlab.nn.modules",
    "bnlab.norms": "bnlab.nn.norms",
    "bnlab.fusion": "bnlab.inference.fusion",
    "bnlab.freeze": "bnlab.inference.freeze",
    "bnlab.recalibrate": "bnlab.inference.recalibrate",
    "bnlab.kernels.autograd": "bnlab.kernels.autograd",
    "bnlab.check": "bnlab.teaching.check",
    "bnlab.widgets": "bnlab.teaching.widgets",
    "bnlab.data": "bnlab.experiments.data",
    "bnlab.models": "bnlab.experiments.models",
    "bnlab.train": "bnlab.experiments.train",
}


def _package_modules() -> dict[str, list[str]]:
    return {
        pkg: sorted(p.stem for p in (ROOT / "bnlab" / pkg).glob("*.py") if p.stem[0] != "_")
        for pkg in PACKAGES
    }


def test_package_docstring_names_every_folder_and_module():
    import bnlab

    top = {p.stem for p in (ROOT / "bnlab").glob("*.py") if p.stem != "__init__"}
    top |= {p.name for p in (ROOT / "bnlab").iterdir() if (p / "__init__.py").is_file()}
    assert set(PACKAGES) <= top
    missing = [m for m in sorted(top) if f"``{m}``" not in bnlab.__doc__]
    assert not missing, f"bnlab/__init__.py's docstring does not name {missing}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_each_folder_docstring_names_its_modules_and_each_module_its_notebook(pkg):
    folder = importlib.import_module(f"bnlab.{pkg}")
    for name in _package_modules()[pkg]:
        assert f"``{name}``" in folder.__doc__, f"bnlab/{pkg}/__init__.py does not name {name}"
        doc = ast.get_docstring(ast.parse((ROOT / "bnlab" / pkg / f"{name}.py").read_text()))
        assert doc, f"bnlab/{pkg}/{name}.py has no docstring"
        assert re.search(r"[Nn]otebooks? \d\d|\(\d\d[,)]|make bench|make test", doc), (
            f"bnlab/{pkg}/{name}.py's docstring names no notebook it serves"
        )


@pytest.mark.parametrize("path, home", LEARNER_PATHS.items())
def test_learner_import_paths_are_the_modules_themselves(path, home):
    module = importlib.import_module(path)
    assert module is importlib.import_module(home)
    parent, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(parent), name) is module  # from bnlab import ...
    assert module.__doc__ and module.__name__ == home


def test_python_m_bnlab_data_still_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bnlab.data", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "python -m bnlab.data" in out.stdout


def test_tests_mirror_the_package():
    """tests/<folder>/test_<module>.py tests bnlab/<folder>/<module>.py; no test file strays."""
    modules = _package_modules()
    for path in (ROOT / "tests").glob("*/test_*.py"):
        pkg = path.parent.name
        if pkg in ("browser", "site"):  # JupyterLab, the website: test the course, not a module
            continue
        assert pkg in modules, f"{path.relative_to(ROOT)}: no package bnlab/{pkg}"
        assert path.stem[len("test_") :] in modules[pkg], (
            f"{path.relative_to(ROOT)} names no module of bnlab/{pkg}"
        )
    for path in (ROOT / "tests").glob("test_*.py"):
        assert path.stem in ("test_config", "test_project"), f"{path.name} belongs in a folder"


def test_the_bn_math_imports_without_the_course_extras():
    """bnlab.nn and the kernels need torch, numpy and numba only; the course adds the rest."""
    # (not tqdm: torch itself imports it when it is installed)
    code = (
        "import sys, bnlab.functional, bnlab.modules, bnlab.norms, bnlab.nn.hooks, "
        "bnlab.nn.merge, bnlab.kernels.autograd, bnlab.kernels.cpu, bnlab.inference.fusion; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torchvision', 'jupyterlab', 'ipywidgets', 'matplotlib', 'IPython'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_setup_installs_the_extras_the_course_needs():
    text = (ROOT / "Makefile").read_text()
    assert '-e ".[course,dev]"' in text


# ------------------------------------------------------------------ make setup checks first
# The Makefile's setup runs here with stand-ins for the system Python and the venv's Python,
# which log what they are asked to do: nothing is created or installed for real.

FAKE_SYSTEM_PYTHON = """#!/bin/sh
# A Python {version} stand-in: answers the version check, creates a stand-in venv.
case "$1" in
  -c) echo {version}; [ {ok} = yes ] ;;
  -m) echo "create $3" >> calls.log; mkdir -p "$3/bin" && cp venv-python "$3/bin/python" ;;
esac
"""
FAKE_VENV_PYTHON = """#!/bin/sh
# The venv's Python: pip fails when the venv holds a file named broken-pip.
here=$(dirname "$0")/..
case "$*" in
  "-m pip --version") [ ! -e "$here/broken-pip" ] ;;
  -m\\ pip\\ install*) echo "$*" >> calls.log ;;
esac
"""


def _make_setup(folder: Path, python: str, **variables: str) -> tuple[int, str, list[str]]:
    """`make setup` in ``folder`` with these stand-ins: (exit code, output, calls logged)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    log = folder / "calls.log"
    log.unlink(missing_ok=True)
    args = [f"PYTHON={python}", "VENV=venv", *(f"{k}={v}" for k, v in variables.items())]
    command = ["make", "-s", "-f", str(ROOT / "Makefile"), "setup", *args]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, done.stdout + done.stderr, calls


@pytest.fixture
def setup_folder(tmp_path):
    """A folder with pyproject.toml and the two Python stand-ins (3.9.2 and 3.12.1)."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for name, text in {
        "python3.9": FAKE_SYSTEM_PYTHON.format(version="3.9.2", ok="no"),
        "python3.12": FAKE_SYSTEM_PYTHON.format(version="3.12.1", ok="yes"),
        "venv-python": FAKE_VENV_PYTHON,
    }.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return tmp_path


def test_make_setup_checks_the_python_version_before_creating_anything(setup_folder):
    code, said, calls = _make_setup(setup_folder, "./python3.9")
    assert code != 0 and calls == [] and not (setup_folder / "venv").exists()
    assert "Python 3.11 or newer" in said and "3.9.2" in said, said
    assert "make setup PYTHON=python3.12" in said
    code, said, calls = _make_setup(setup_folder, "./no-such-python")
    assert code != 0 and "./no-such-python was not found" in said and calls == []


def test_a_venv_whose_pip_does_not_work_is_rebuilt(setup_folder):
    venv = setup_folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (setup_folder / "venv-python").replace(venv / "bin" / "python")  # a half-built venv
    (setup_folder / "venv" / "broken-pip").touch()
    (setup_folder / "venv-python").write_text(FAKE_VENV_PYTHON)
    (setup_folder / "venv-python").chmod(0o755)
    code, said, calls = _make_setup(setup_folder, "./python3.12")
    assert code == 0, said
    assert calls[0] == "create venv" and not (venv / "broken-pip").exists()
    assert any("pip install -q torch==" in c for c in calls), calls


def test_setup_installs_again_when_torch_pkgs_change(setup_folder):
    assert _make_setup(setup_folder, "./python3.12")[0] == 0
    code, said, calls = _make_setup(setup_folder, "./python3.12")
    assert code == 0 and calls == [], calls  # nothing changed: nothing to do
    other = "torch==2.5.1 torchvision==0.20.1"
    code, said, calls = _make_setup(setup_folder, "./python3.12", TORCH_PKGS=other)
    assert code == 0 and f"-m pip install -q {other}" in calls, calls
    assert "create venv" not in calls  # the venv works: it is kept
    assert _make_setup(setup_folder, "./python3.9", TORCH_PKGS=other)[2] == []  # done already


def test_the_makefiles_python_check_is_pyprojects_requires_python():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = re.search(r"^PYTHON_MIN := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert meta["requires-python"] == f">={minimum}"


# ------------------------------------------------------------------ make chromium: bounded apt
def _make_chromium(tmp_path: Path, **variables: str) -> tuple[int, str, list[str]]:
    """`make chromium` as root, with no chromium and apt-get's stand-in on the PATH."""
    import os
    import shutil

    from helpers import apt_calls, fake_apt_get

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    env.update(fake_apt_get(bin_dir), PATH=str(bin_dir))
    for tool in ("timeout", "sleep", "date", "cat", "id"):  # and nothing else: no chromium
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    args = ["IS_ROOT=0", *(f"{k}={v}" for k, v in variables.items())]
    command = [shutil.which("make"), "-s", "-f", str(ROOT / "Makefile"), "chromium", *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, apt_calls(bin_dir)


def test_make_chromium_waits_for_apts_lock_60_s_and_refreshes_the_lists_once(tmp_path):
    code, said, calls = _make_chromium(tmp_path)
    assert code == 0, said
    lock = "-o DPkg::Lock::Timeout=60"
    install = f"{lock} install -y -qq chromium"
    assert calls == [install, f"{lock} update -qq", install]


def test_make_chromium_stops_apt_and_its_children_when_time_is_up(tmp_path):
    from helpers import gone

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hang").touch()
    code, said, calls = _make_chromium(tmp_path, APT_TIMEOUT="1")
    assert code != 0 and "ran out of its 1 s" in said and "dpkg --configure -a" in said, said
    pids = [int(p) for p in (tmp_path / "bin" / "pids").read_text().split()]
    assert len(pids) == 2 and gone(pids), "apt-get or its child outlived the timeout"
    assert calls == ["-o DPkg::Lock::Timeout=60 install -y -qq chromium"]


def test_the_license_file_is_the_license_pyproject_declares():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "LICENSE").read_text()
    assert meta["license"] == "MIT" and text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} bnlab contributors$", text, re.M)
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_every_message_row_of_the_bad_inputs_doc_names_a_test_that_exists():
    doc = (ROOT / "docs" / "bad-inputs.md").read_text()
    named = re.findall(r"\| `(tests/[\w/]+\.py)::(test_\w+)` \|$", doc, re.M)
    assert len(named) >= 12, "the message table lost its rows"
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"
