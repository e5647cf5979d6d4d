"""make bench's CPU cases (bnlab.bench.cpu), on tiny shapes: the schema, the byte counts,
the goals' logic and the store's rows (numbers, never speeds)."""

from __future__ import annotations

import pytest
import torch

from bnlab.bench import cpu

KEYS = {
    "device", "shape", "layout", "dtype", "impl", "mode", "median_s", "iqr_s", "repeats",
    "threads", "speedup_vs_torch", "passes", "bandwidth_GBps", "bandwidth_fraction",
}  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_measure_shape_gives_every_implementation_in_every_mode(layout):
    cases = cpu.measure_shape((4, 3, 5, 5), layout, repeats=2, copy_GBps=10.0)
    assert {(c["impl"], c["mode"]) for c in cases} == {
        (i, m) for i in ("torch", "bnlab kernel", "bnlab scratch") for m in cpu.MODES
    }
    nbytes = 4 * 3 * 5 * 5 * 4
    for c in cases:
        assert set(c) == KEYS and c["layout"] == layout and c["repeats"] == 2
        assert (
            c["passes"]
            == {"train fwd": 3, "train fwd+bwd": 8, "eval": 2, "eval+relu": 2}[c["mode"]]
        )
        assert c["bandwidth_GBps"] == pytest.approx(c["passes"] * nbytes / c["median_s"] / 1e9)
        assert c["bandwidth_fraction"] == pytest.approx(c["bandwidth_GBps"] / 10.0)
        torch_case = next(t for t in cases if t["impl"] == "torch" and t["mode"] == c["mode"])
        assert c["speedup_vs_torch"] == pytest.approx(torch_case["median_s"] / c["median_s"])
    large = cpu.measure_shape((4, 3), repeats=1, large=True, modes=("eval",))
    assert {c["impl"] for c in large} == {"torch", "bnlab kernel"}  # no scratch on large shapes
    assert all(c["bandwidth_fraction"] is None for c in large)  # no copy figure: no fraction


def test_large_shape_is_at_least_four_times_the_cache():
    shape = cpu.large_shape(260 * 2**20)
    nbytes = 4 * torch.Size(shape).numel()
    assert nbytes >= cpu.CACHE_FACTOR * 260 * 2**20 and shape[0] % 8 == 0
    assert 4 * torch.Size((shape[0] - 8, *shape[1:])).numel() < cpu.CACHE_FACTOR * 260 * 2**20
    assert cpu.large_shape(None) == (64, 64, 112, 112)
    llc = cpu.last_level_cache_bytes()
    assert llc is None or llc >= 2**20


def _case(shape, mode, speedup, fraction=None, layout="contiguous", impl="bnlab kernel"):
    return dict(shape=list(shape), mode=mode, speedup_vs_torch=speedup, layout=layout, impl=impl,
                bandwidth_fraction=fraction, median_s=1.0, iqr_s=0.1)  # fmt: skip


def test_goals_are_judged_on_the_kernels_medians():
    cases = [
        _case((32, 64, 56, 56), "train fwd+bwd", 2.1),
        _case((256, 64, 28, 28), "train fwd+bwd", 1.9),
        _case((1024, 512), "train fwd+bwd", 1.0),
        _case((1024, 512), "eval+relu", 1.49),
        _case((1024, 512), "train fwd+bwd", 9.0, impl="torch"),  # not the kernel: ignored
        _case((344, 64, 112, 112), "train fwd+bwd", 1.2, fraction=0.61),
    ]
    found = {g["what"]: g["met"] for g in cpu.goals(cases)}
    assert found == {
        "train fwd+bwd >= 2x torch at (32, 64, 56, 56)": True,
        "train fwd+bwd >= 2x torch at (256, 64, 28, 28)": False,
        "train fwd+bwd >= 1x torch at (1024, 512)": True,
        "eval BN+ReLU >= 1.5x torch's batch_norm + relu_ at (1024, 512)": False,
        "train fwd+bwd >= 60% of copy bandwidth at (344, 64, 112, 112) contiguous": True,
    }
    assert "NOT met" in cpu.format_goals(cpu.goals(cases))


def test_record_cpu_writes_one_figure_per_shape_and_layout(monkeypatch):
    from bnlab.teaching import results

    recorded = {}
    monkeypatch.setattr(results, "record", lambda key, value, what, text, table: recorded.update(
        {key: {"value": value, "text": text, "table": table}}))  # fmt: skip
    cases = cpu.measure_shape((4, 3, 5, 5), "channels_last", repeats=1)
    facts = dict(allocator="default", threads=1, copy_GBps=10.0, llc_bytes=2**25,
                 large_shape=[8, 3, 5, 5], first_touch_s=0.001)  # fmt: skip
    cpu.record_cpu(cases, facts)
    assert set(recorded) == {"bench.cpu.default.machine", "bench.cpu.default.4x3x5x5.cl"}
    entry = recorded["bench.cpu.default.4x3x5x5.cl"]
    assert entry["table"] == "bench" and set(cpu.MODES) <= set(entry["value"])
    kernel = {c["mode"]: c["speedup_vs_torch"] for c in cases if c["impl"] == "bnlab kernel"}
    assert entry["value"]["eval+relu"] == round(kernel["eval+relu"], 3)
    data = {"figures": {k: {"value": v["value"]} for k, v in recorded.items()}}
    data["figures"]["bench.cpu.default.goals"] = {"value": [{"what": "a goal", "met": True}]}
    (row,) = cpu.stored_kernel_table(data)
    assert row["allocator"] == "default" and row["layout"] == "channels_last"


def test_allocator_setting_is_read_from_the_environment(monkeypatch):
    for key in cpu.WARM_ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cpu.allocator() == "default"
    for key, value in cpu.WARM_ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    assert cpu.allocator() == "warm"


def test_format_cases_and_cpu_model():
    text = cpu.format_cases(cpu.measure_shape((4, 3), repeats=1, copy_GBps=5.0, modes=("eval",)))
    assert "bnlab kernel" in text and "(4, 3)" in text and "%" in text
