"""bnlab.teaching.timings: the README's timings, measured from a fresh clone."""

from __future__ import annotations

import pytest

from bnlab.teaching import results, timings


def test_duration_reads_like_the_readme():
    assert results.duration(42.4) == "42 s"
    assert results.duration(95) == "1 min 35 s"
    assert results.duration(1017) == "16 min 57 s"


def test_describe_reads_test_counts_from_pytests_summaries(tmp_path):
    output = "846 passed in 57.1s\n...\n170 passed, 3 warnings in 160.0s\n"
    assert timings.describe("test", 220, output, tmp_path) == (
        "3 min 40 s: 846 unit tests, then 170 notebook cells in FAST mode"
    )
    assert (
        timings.describe("test-deep", 70, "900 passed in 70s", tmp_path) == "1 min 10 s: 900 tests"
    )
    assert timings.describe("bench", 24, "", tmp_path) == "24 s"


def test_venv_sizes_groups_the_big_packages(tmp_path):
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    for name, size in {
        "torch": 300,
        "nvidia_cudnn": 200,
        "nvidia": 100,
        "triton": 50,
        "numpy": 7,
    }.items():
        (site / name).mkdir(parents=True)
        (site / name / "blob").write_bytes(b"x" * size)
    sizes = timings.venv_sizes(tmp_path)
    assert sizes == {"total": 657, "torch": 300, "CUDA libraries": 300, "triton": 50}


def test_run_step_raises_with_the_output_when_make_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKELEVEL", "1")  # as under `make timings`: the step must not inherit it
    (tmp_path / "Makefile").write_text("boom:\n\t@echo about to fail; exit 3\n")
    with pytest.raises(RuntimeError, match="about to fail"):
        timings.run_step(tmp_path, "boom")
    (tmp_path / "Makefile").write_text("ok:\n\t@echo fine\n")
    seconds, output = timings.run_step(tmp_path, "ok")
    assert output == "fine\n" and seconds >= 0


def test_machine_names_cores_memory_and_gpu():
    text = timings.machine()
    assert "cores of" in text and "GiB" in text and "GPU" in text


def test_cpu_model_is_the_one_machine_names():
    model = timings.cpu_model()
    assert model and f"of {model}," in timings.machine()
