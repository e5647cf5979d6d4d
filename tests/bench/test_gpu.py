"""bnlab.bench.gpu: make bench-gpu's logic, on Numba's CUDA simulator with tiny shapes.

Without a GPU the kernels run on the simulator, on CPU tensors, so the checks and the
case building run here as on a GPU, with ``sync`` a no-op and a given peak bandwidth.
The simulator is chosen before numba.cuda is imported (bnlab.kernels.backend). No test
asserts a time: only the arithmetic that turns times into the reported figures.
"""

from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import deep_only

from bnlab.bench import gpu
from bnlab.kernels import autograd, backend

cuda = backend.cuda_module()  # the simulator here, unless a GPU is present
from bnlab.kernels import cuda as K  # noqa: E402 (after the backend choice)

DEV = "cpu" if K.SIMULATOR else "cuda"
SIM = {"device": DEV, "backend": "cuda"}
# N*HW = 16 and 6 values per channel; the last in channels_last memory format
TINY = [((6, 4), "contiguous"), ((2, 3, 2, 2), "channels_last")]  # (4, 3, 2, 2): make test-deep
CASE_KEYS = {
    "device": str,
    "device_name": str,
    "shape": list,
    "layout": str,
    "dtype": str,
    "impl": str,
    "mode": str,
    "median_s": float,
    "iqr_s": float,
    "repeats": int,
    "speedup_vs_torch": float,
    "passes": int,
    "bandwidth_GBps": float,
    "bandwidth_fraction": float,
}


@pytest.mark.parametrize(
    "shape, layout",
    [pytest.param((4, 3, 2, 2), "contiguous", marks=deep_only), *TINY],
    ids=lambda v: str(v),
)
def test_the_kernels_pass_the_check_on_tiny_shapes(shape, layout):
    report = gpu.check_against_torch(shape, layout, **SIM)
    assert report["error"] is None, report["error"]
    assert report["passed"], gpu.failure_message(report)
    assert set(report["diffs"]) == {
        "y", "dx", "dgamma", "dbeta", "running_mean", "running_var", "eval y"
    }  # fmt: skip
    assert report["diffs"][report["worst"]]["ratio"] <= 1
    assert gpu.format_check(report).startswith("ok ")


def test_a_corrupted_kernel_fails_the_check_naming_the_shape(monkeypatch):
    real = autograd.batch_norm
    monkeypatch.setattr(autograd, "batch_norm", lambda *a, **k: real(*a, **k) + 1e-2)
    report = gpu.check_against_torch((4, 3, 2, 2), **SIM)
    assert not report["passed"]
    assert report["diffs"]["y"]["max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)
    assert report["diffs"]["dx"]["ratio"] <= 1  # adding a constant leaves the gradients alone
    message = gpu.failure_message(report)
    assert "(4, 3, 2, 2) contiguous" in message and "y max |diff|" in message


def test_a_kernel_that_raises_is_a_failed_check(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("input must be contiguous")

    monkeypatch.setattr(autograd, "batch_norm", refuse)
    report = gpu.check_against_torch((2, 3, 2, 2), "channels_last", **SIM)
    assert not report["passed"] and "ValueError: input must be contiguous" in report["error"]
    assert "(2, 3, 2, 2) channels_last" in gpu.failure_message(report)


def _fake(medians: dict[str, float]) -> dict[str, SimpleNamespace]:
    return {impl: SimpleNamespace(median=m, iqr=m / 10) for impl, m in medians.items()}


def test_cases_have_the_schema_and_speedup_is_torch_over_impl():
    measured = {
        "train fwd": _fake({"torch": 2e-3, "bnlab kernel": 4e-3}),
        "train fwd+bwd": _fake({"torch": 6e-3, "bnlab kernel": 5e-3}),
        "eval": _fake({"torch": 1e-3, "bnlab kernel": 1e-3}),
    }
    cases = gpu.build_cases((8, 4, 5, 5), "contiguous", measured, 3, 100.0, "fake GPU")
    assert len(cases) == 6
    nbytes = 8 * 4 * 5 * 5 * 4
    for case in cases:
        assert {k: type(v) for k, v in case.items()} == CASE_KEYS
        m = measured[case["mode"]]
        assert case["speedup_vs_torch"] == m["torch"].median / m[case["impl"]].median
        assert case["passes"] == {"train fwd": 3, "train fwd+bwd": 8, "eval": 2}[case["mode"]]
        bandwidth = case["passes"] * nbytes / case["median_s"] / 1e9
        assert case["bandwidth_GBps"] == pytest.approx(bandwidth)
        assert case["bandwidth_fraction"] == pytest.approx(bandwidth / 100.0)
        assert (case["device"], case["dtype"], case["shape"]) == ("cuda", "float32", [8, 4, 5, 5])
    kernel_bwd = next(c for c in cases if c["impl"] == "bnlab kernel" and "bwd" in c["mode"])
    assert kernel_bwd["speedup_vs_torch"] == pytest.approx(1.2)
    assert "train fwd+bwd" in gpu.format_cases(cases)


def test_goals_are_computed_from_the_goal_shapes_fwd_bwd_case():
    shape = (64, 256, 56, 56)
    nbytes = math.prod(shape) * 4
    peak = 8 * nbytes / 1e-3 / 1e9 / 0.8  # a 1 ms fwd+bwd would be 80% of this peak

    def goals(kernel_ms, layout="contiguous"):
        measured = {"train fwd+bwd": _fake({"torch": 0.95e-3, "bnlab kernel": kernel_ms / 1e3})}
        return gpu.compute_goals(gpu.build_cases(shape, layout, measured, 3, peak, "fake"))

    fast, slow = goals(1.0), goals(1.25)
    assert [g["met"] for g in fast] == [True, True]
    assert fast[0]["value"] == pytest.approx(0.95) and fast[1]["value"] == pytest.approx(0.8)
    assert [g["met"] for g in slow] == [False, False]
    assert slow[0]["value"] == pytest.approx(0.76) and slow[1]["value"] == pytest.approx(0.64)
    assert fast[0]["what"] == "fwd+bwd >= 0.9x torch at (64, 256, 56, 56)"
    assert fast[1]["what"].startswith(">= 75% of peak bandwidth at (64, 256, 56, 56)")
    # channels_last figures do not stand in for the contiguous goal: not measured, not met
    assert [(g["value"], g["met"]) for g in goals(1.0, "channels_last")] == [(None, False)] * 2
    assert "not measured" in gpu.format_goals(goals(1.0, "channels_last"))


@deep_only  # the simulator times every mode: ~15 s
def test_run_checks_times_and_writes_the_json_where_asked(tmp_path, capsys):
    path = tmp_path / "out" / "gpu.json"
    facts = {"device_name": "CUDA simulator", "peak_GBps": 50.0, "torch_backend": "Native"}
    status = gpu.run(
        [((4, 3, 2, 2), "contiguous")], path, repeats=1, clock=gpu.HostClock(),
        goal_shape=(4, 3, 2, 2), **facts, **SIM,
    )  # fmt: skip
    assert status == 0
    doc = json.loads(path.read_text())
    assert {k: doc[k] for k in ("schema", "kind", "measured")} == {
        "schema": 1, "kind": "bench-gpu", "measured": True
    }  # fmt: skip
    assert doc["torch"] == torch.__version__ and doc["numba_cuda"]
    assert (doc["device_name"], doc["peak_GBps"], doc["torch_backend"]) == tuple(facts.values())
    cases = doc["cases"]
    assert {(c["mode"], c["impl"]) for c in cases} == {
        (mode, impl) for mode in gpu.MODES for impl in gpu.IMPLS
    }
    for case in cases:
        assert {k: type(v) for k, v in case.items()} == CASE_KEYS
        torch_case = next(c for c in cases if c["mode"] == case["mode"] and c["impl"] == "torch")
        assert case["speedup_vs_torch"] == pytest.approx(torch_case["median_s"] / case["median_s"])
        assert case["repeats"] == 1 and case["median_s"] > 0
    kernel = next(c for c in cases if c["impl"] == "bnlab kernel" and c["mode"] == "train fwd+bwd")
    assert doc["goals"][0]["value"] == pytest.approx(kernel["speedup_vs_torch"])
    assert doc["goals"][1]["value"] == pytest.approx(kernel["bandwidth_fraction"])
    assert doc["checks"][0]["passed"]
    out = capsys.readouterr().out
    assert "ok   (4, 3, 2, 2)" in out and f"wrote {path}" in out


def test_run_exits_1_naming_the_shape_when_a_check_fails(tmp_path, capsys, monkeypatch):
    real = autograd.batch_norm
    monkeypatch.setattr(autograd, "batch_norm", lambda *a, **k: real(*a, **k) * float("nan"))
    facts = {"device_name": "CUDA simulator", "peak_GBps": 50.0, "torch_backend": "Native"}
    path = tmp_path / "gpu.json"
    status = gpu.run(
        [((6, 4), "contiguous")], path, repeats=1, clock=gpu.HostClock(), **facts, **SIM
    )
    assert status == 1
    assert "disagrees with torch at shape (6, 4) contiguous" in capsys.readouterr().err

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    doc = json.loads(path.read_text(), parse_constant=strict)
    assert doc["cases"] == [] and not doc["checks"][0]["passed"]  # a failed shape is not timed
    assert doc["checks"][0]["diffs"]["y"]["ratio"] == "nan"  # NaN fails, written as a string
    assert [g["met"] for g in doc["goals"]] == [False, False]


def test_main_without_a_gpu_says_so_and_measures_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.json"
    assert gpu.main(["--json", str(path), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out == gpu.NO_GPU + "\n"
    assert not path.exists()


def test_shape_arguments():
    assert gpu.parse_shape("64x256x56x56") == ((64, 256, 56, 56), "contiguous")
    assert gpu.parse_shape("2,3,4,4:channels_last") == ((2, 3, 4, 4), "channels_last")
    for bad in ("64", "4x3:planar", "4x3:channels_last", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="shape|layout|need"):
            gpu.parse_shape(bad)


def test_peak_bandwidth_from_the_attributes_else_the_name_table():
    # H100 SXM: 2619 MHz x 2 x 5120 bits = 3.35 TB/s
    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3", 2_619_000, 5120) == (
        pytest.approx(3352.3, abs=0.1),
        "device attributes",
    )
    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3", None, None) == (3350.0, "name table")
    assert gpu.peak_bandwidth("NVIDIA H100 PCIe", 0, 5120) == (2000.0, "name table")
    assert gpu.peak_from_name("NVIDIA H200") == 4800.0
    assert gpu.peak_from_name("NVIDIA A100-SXM4-80GB") == 2039.0
    with pytest.raises(ValueError, match="HBM_PEAK_GBPS"):
        gpu.peak_bandwidth("Some GPU", None, 384)


def test_the_peak_attributes_are_read_through_numba(monkeypatch):
    h100_sxm = SimpleNamespace(MEMORY_CLOCK_RATE=2_619_000, GLOBAL_MEMORY_BUS_WIDTH=5120)
    fake = SimpleNamespace(get_current_device=lambda: h100_sxm)
    monkeypatch.setattr(backend, "cuda_module", lambda: fake)
    assert gpu._memory_attributes() == (2_619_000, 5120)


class FakeClock:
    """Records the calls; each timing lasts as long as the fake call says it does."""

    def __init__(self):
        self.log = []

    def flush(self):
        self.log.append("flush")

    def start(self):
        return None

    def stop(self, started):
        return self.log[-1]

    def seconds(self, token):
        return {"a": 1.0, "b": 3.0}[token[0]] + token[1]


def test_timing_is_interleaved_flushed_and_drops_the_warm_up():
    clock = FakeClock()
    calls = {"a": 0, "b": 0}

    def call(name):
        def fn():
            calls[name] += 1
            clock.log.append((name, calls[name]))

        return fn

    out = gpu.time_interleaved({"a": call("a"), "b": call("b")}, repeats=3, clock=clock, warmup=2)
    names = [e[0] for e in clock.log if e != "flush"]
    assert names == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # A B, B A, ...
    assert clock.log[::2] == ["flush"] * 10  # a flush before every call
    assert out["a"].times == [4.0, 5.0, 6.0]  # the calls numbered 3-5: warm-up 1-2 dropped
    assert (out["a"].median, out["b"].median) == (5.0, 7.0)
    assert out["a"].iqr == pytest.approx(1.0)


def test_run_past_its_budget_lists_shapes_as_skipped(tmp_path, capsys):
    facts = {"device_name": "CUDA simulator", "peak_GBps": 50.0, "torch_backend": "Native"}
    path = tmp_path / "gpu.json"
    status = gpu.run([((6, 4), "contiguous")], path, repeats=1, budget_s=0.0, **facts, **SIM)
    assert status == 0
    doc = json.loads(path.read_text())
    assert doc["cases"] == [] and doc["checks"][0]["passed"]
    assert doc["skipped"] == [{"shape": [6, 4], "layout": "contiguous"}]
    assert "not timed (past the 0 s budget): (6, 4) contiguous" in capsys.readouterr().out


def test_the_goal_shape_is_timed_first_and_moves_more_than_the_l2():
    assert gpu.SHAPES[0] == (gpu.GOAL_SHAPE, "contiguous")
    x_bytes = math.prod(gpu.GOAL_SHAPE) * 4
    assert x_bytes > 3.5 * 50 * 2**20  # x alone is ~4 H100 L2s: every pass reaches HBM
