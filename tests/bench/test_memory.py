"""bnlab.bench.memory: peak memory measured by the OS, in a fresh process per call.

The measurement is checked against a known allocation first (the "probe" allocates and
frees K tensors), then the implementations are held to the outputs they must create.
Each call starts a Python process (a few seconds); no test asserts a time.
"""

from __future__ import annotations

import sys

import pytest
from helpers import deep_only

from bnlab.bench import memory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

PROBE_SHAPE = (8, 64, 64, 64)  # 8 MiB per float32 tensor
SMALL = (16, 64, 32, 32)  # 4 MiB: small, but far above page and allocator granularity


@pytest.mark.parametrize(
    "k, allocator",
    [
        pytest.param(0, "mmap", marks=deep_only),
        (3, "mmap"),
        pytest.param(3, "glibc", marks=deep_only),
    ],
)
def test_the_probe_reports_the_tensors_it_allocated(k, allocator):
    row = memory.peak_extra_bytes(f"probe:{k}", PROBE_SHAPE, allocator=allocator)
    assert row["allocator"] == allocator
    assert row["tensor_bytes"] == 8 * 2**20
    assert abs(row["peak_extra_tensors"] - k) <= 0.25, row
    assert abs(row["peak_extra_bytes"] / row["tensor_bytes"] - row["peak_extra_tensors"]) < 1e-12
    # the probe frees its tensors: the figure is the peak, not what was left at the end
    assert row["retained_bytes"] <= 0.25 * row["tensor_bytes"], row
    assert row["method"] in ("VmHWM reset by clear_refs", "VmHWM since process start")
    assert row["hwm_slack_bytes"] <= 0.25 * row["tensor_bytes"]


@pytest.mark.parametrize("impl", [pytest.param("torch", marks=deep_only), "bnlab kernel"])
def test_a_fwd_bwd_peak_holds_at_least_its_outputs_y_and_dx(impl):
    row = memory.peak_extra_bytes(impl, SMALL, "train fwd+bwd")
    assert row["output_tensors"] == pytest.approx(2, abs=0.01)  # y, dx (and dgamma, dbeta)
    assert row["peak_extra_tensors"] >= row["output_tensors"] - 0.25, row
    assert (row["impl"], row["shape"], row["mode"]) == (impl, list(SMALL), "train fwd+bwd")


def test_bad_arguments_are_refused_before_a_process_starts():
    with pytest.raises(ValueError, match="impl must be one of"):
        memory.peak_extra_bytes("numpy", SMALL)
    with pytest.raises(ValueError, match="mode must be one of"):
        memory.peak_extra_bytes("torch", SMALL, mode="backward")
    with pytest.raises(ValueError, match="channels_last for 4-D"):
        memory.peak_extra_bytes("torch", (8, 4), layout="channels_last")
    with pytest.raises(ValueError, match="allocator must be one of"):
        memory.peak_extra_bytes("torch", SMALL, allocator="jemalloc")


def test_the_table_shows_megabytes_and_tensors():
    row = {
        "impl": "bnlab kernel",
        "shape": [2, 3],
        "mode": "train fwd+bwd",
        "peak_extra_bytes": 12_000_000,
        "peak_extra_tensors": 2.5,
        "output_tensors": 2.0,
        "retained_bytes": 8_000_000,
    }
    text = memory.format_memory_table([row])
    assert "(2, 3)" in text and "bnlab kernel" in text
    assert "12.0" in text and "2.50" in text and "8.0" in text


def test_record_memory_puts_one_figure_per_shape_in_the_store(monkeypatch):
    from bnlab.teaching import results

    seen = {}
    monkeypatch.setattr(results, "record", lambda key, value, what, text, table: seen.update(
        {key: (value, text, table)}))  # fmt: skip
    rows = [
        {
            "shape": [4, 3],
            "impl": i,
            "mode": "train fwd+bwd",
            "peak_extra_bytes": b,
            "peak_extra_tensors": b / 48,
        }  # fmt: skip
        for i, b in (("torch", 96), ("bnlab kernel", 96))
    ]
    memory.record_memory(rows)
    value, text, table = seen["bench.memory.4x3"]
    assert value == {"torch": 96, "bnlab kernel": 96} and table == "bench"
    assert "torch 0.00 MB = 2.00 tensors" in text
