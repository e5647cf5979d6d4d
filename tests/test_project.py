"""The project's own files agree with each other: pyproject, environment.yml, Makefile."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
    specs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
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


def test_package_docstring_names_every_module():
    import bnlab

    modules = {p.stem for p in (ROOT / "bnlab").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (ROOT / "bnlab").iterdir() if (p / "__init__.py").is_file()}
    missing = [m for m in sorted(modules) if f"``{m}``" not in bnlab.__doc__]
    assert not missing, f"bnlab/__init__.py's docstring does not name {missing}"
