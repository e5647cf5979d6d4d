"""make bench's CPU cases (bnlab.bench.cpu), on tiny shapes: the schema, the byte counts,
the goals' logic and the store's rows (numbers, never speeds)."""

from __future__ import annotations

import pytest
import torch

from bnlab.bench import cases as cases_mod
from bnlab.bench import cpu

KEYS = {
    "device",
    "shape",
    "layout",
    "dtype",
    "impl",
    "mode",
    "median_s",
    "iqr_s",
    "repeats",
    "threads",
    "speedup_vs_torch",
    "passes",
    "bandwidth_GBps",
    "bandwidth_fraction",
}
FLOOR_KEYS = {"traffic", "floor_s", "floor_unblocked_s", "floor_fraction"}
BANDWIDTHS = {"read_GBps": 10.0, "write_GBps": 5.0, "copy_GBps": 6.0}


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile's place taken by the eager functions: the plumbing, without inductor."""
    monkeypatch.setattr(
        cpu,
        "compiled_batch_norm",
        lambda: {"bn": torch.nn.functional.batch_norm, "bn_relu": cpu._eager_bn_relu},
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_measure_shape_gives_every_implementation_in_every_mode(layout, eager_compile):
    cases = cpu.measure_shape((4, 3, 5, 5), layout, repeats=2, bandwidths=BANDWIDTHS, compiled=True)
    expected = {(i, m) for i in ("torch", "bnlab kernel", "bnlab scratch") for m in cpu.MODES}
    assert {(c["impl"], c["mode"]) for c in cases} == expected | {
        (cpu.COMPILE, m) for m in cpu.COMPILED_MODES
    }
    nbytes = 4 * 3 * 5 * 5 * 4
    kind = "blocked" if layout == "contiguous" else "unblocked"
    for c in cases:
        compiled = {"compile_s"} if c["impl"] == cpu.COMPILE else set()
        assert set(c) == KEYS | FLOOR_KEYS | compiled and c["layout"] == layout
        assert c["repeats"] == 2 and c["traffic"] == kind
        assert (
            c["passes"]
            == {"train fwd": 3, "train fwd+bwd": 8, "eval": 2, "eval+relu": 2}[c["mode"]]
        )
        assert c["bandwidth_GBps"] == pytest.approx(c["passes"] * nbytes / c["median_s"] / 1e9)
        reads, writes = cases_mod.TRAFFIC[kind][c["mode"]]
        floor = reads * nbytes / 10e9 + writes * nbytes / 5e9
        assert c["floor_s"] == pytest.approx(floor)
        assert c["floor_fraction"] == pytest.approx(floor / c["median_s"])
        assert c["floor_unblocked_s"] >= c["floor_s"]
        torch_case = next(t for t in cases if t["impl"] == "torch" and t["mode"] == c["mode"])
        assert c["speedup_vs_torch"] == pytest.approx(torch_case["median_s"] / c["median_s"])
        assert c.get("compile_s", 1.0) > 0
    large = cpu.measure_shape((4, 3), repeats=1, large=True, modes=("eval",))
    assert {c["impl"] for c in large} == {"torch", "bnlab kernel"}  # no scratch on large shapes
    assert all("floor_s" not in c for c in large)  # no bandwidths: no floor


def test_the_floor_counts_reads_and_writes_apart_with_and_without_blocking():
    # forward: blocked reads x once (the group's second read is served by the cache)
    assert cases_mod.floor_seconds("train fwd", 10**9, 10.0, 5.0) == pytest.approx(0.1 + 0.2)
    assert cases_mod.floor_seconds("train fwd", 10**9, 10.0, 5.0, "unblocked") == pytest.approx(0.4)
    # forward + backward: 3 reads + 2 writes blocked (5 passes), 6 + 2 without (8)
    assert cases_mod.BLOCKED["train fwd+bwd"] == (3, 2)
    assert sum(cases_mod.UNBLOCKED["train fwd+bwd"]) == cases_mod.PASSES["train fwd+bwd"] == 8
    assert cases_mod.traffic_kind((8, 4, 2, 2), "contiguous") == "blocked"
    assert cases_mod.traffic_kind((8, 4, 2, 2), "channels_last") == "unblocked"
    assert cases_mod.traffic_kind((8, 4), "contiguous") == "unblocked"


def test_bandwidths_count_copy_as_three_bytes_moved(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(
        cpu,
        "measure_interleaved",
        lambda fns, repeats: {k: SimpleNamespace(median=1.0) for k in fns},
    )
    found = cpu.bandwidths(4 * 10**6, repeats=1)
    assert found == pytest.approx({"read_GBps": 4e-3, "write_GBps": 4e-3, "copy_GBps": 12e-3})
    real = cpu.bandwidths(4 * 2**16, repeats=2)
    assert set(real) == {"read_GBps", "write_GBps", "copy_GBps"} and min(real.values()) > 0


def test_machine_facts_name_the_caches_threading_layer_and_groups():
    caches = cpu.cache_sizes()
    assert set(caches) == {"l2_bytes", "llc_bytes", "source"}
    assert caches["llc_bytes"] is None or caches["llc_bytes"] >= (caches["l2_bytes"] or 0)
    cpu.measure_shape((4, 3, 5, 5), repeats=1, modes=("eval",))  # a kernel ran: a layer is up
    facts = cpu.threading_facts()
    assert facts["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert facts["torch_parallel_backend"] != "unknown"
    groups = cpu.channel_groups((400, 64, 112, 112), threads=2)
    assert groups is None or groups["backward_channels"] <= groups["forward_channels"]
    assert cpu.channel_groups((1024, 512), threads=2) is None
    assert cpu.tiny_like((1024, 512)) == (16, 512) and cpu.tiny_like((32, 64, 56, 56)) == (
        2,
        64,
        4,
        4,
    )


def test_large_shape_is_at_least_four_times_the_cache():
    shape = cpu.large_shape(260 * 2**20)
    nbytes = 4 * torch.Size(shape).numel()
    assert nbytes >= cpu.CACHE_FACTOR * 260 * 2**20 and shape[0] % 8 == 0
    assert 4 * torch.Size((shape[0] - 8, *shape[1:])).numel() < cpu.CACHE_FACTOR * 260 * 2**20
    assert cpu.large_shape(None) == (64, 64, 112, 112)
    llc = cpu.last_level_cache_bytes()
    assert llc is None or llc >= 2**20


def _case(shape, mode, median, impl="bnlab kernel", floor=None, layout="contiguous"):
    case = dict(
        shape=list(shape),
        mode=mode,
        median_s=median,
        impl=impl,
        layout=layout,
        iqr_s=0.1 * median,
        speedup_vs_torch=1.0,
    )
    if floor is not None:
        case |= {"floor_s": floor, "floor_fraction": floor / median, "traffic": "blocked"}
    return case


def _goal_cases(kernel_fb_image=1.0, kernel_small=1.0):
    image, small, big = (32, 64, 56, 56), (1024, 512), (400, 64, 112, 112)
    return [
        _case(image, "train fwd+bwd", 4.0, impl="torch", floor=0.5),
        _case(image, "train fwd+bwd", 1.5, impl=cpu.COMPILE, floor=0.5),
        _case(image, "train fwd+bwd", kernel_fb_image, floor=0.5),  # 4x torch
        _case(small, "train fwd+bwd", 1.0, impl="torch", floor=0.1),
        _case(small, "train fwd+bwd", kernel_small, floor=0.1),
        _case(small, "eval+relu", 1.0, impl="torch", floor=0.9),
        _case(small, "eval+relu", 0.8, floor=0.9),  # 1.25x: floor allows 1.11x
        _case(small, "train fwd+bwd", 9.0, impl="bnlab scratch"),  # not judged
        _case(big, "train fwd", 4.0, floor=2.0),
        _case(big, "train fwd+bwd", 10.0, floor=8.0),
    ]


def test_goals_are_judged_on_the_medians_and_each_miss_says_what_bounds_it():
    facts = {
        "large_shape": [400, 64, 112, 112],
        "first_touch_s": 1.0,
        "per_call_s": {"16x512": {"train fwd+bwd": {"torch": 0.2, "bnlab kernel": 0.6}}},
    }
    found = {g["what"]: g for g in cpu.goals(_goal_cases(kernel_small=1.5), facts)}
    assert {w: g["met"] for w, g in found.items()} == {
        "train fwd+bwd >= 2x torch at (32, 64, 56, 56)": True,
        "train fwd+bwd >= 1x torch at (1024, 512)": False,
        "eval BN+ReLU >= 1.5x torch's batch_norm + relu_ at (1024, 512)": False,
        "train fwd+bwd >= 1x torch.compile(F.batch_norm) at (32, 64, 56, 56)": True,
        "train fwd+bwd >= 90% of its read/write floor at (400, 64, 112, 112) (floor time / "
        "measured time, channel-blocked traffic)": False,
    }
    small = found["train fwd+bwd >= 1x torch at (1024, 512)"]
    assert small["value"] == pytest.approx(1 / 1.5)
    # 0.5 s to shed, 0.4 s of it the kernel's extra per-call time
    assert small["bound"].startswith("per-call overhead: 400000 us more than torch")
    assert small["bound_figures"]["gap_s"] == pytest.approx(0.5)
    eval_relu = found["eval BN+ReLU >= 1.5x torch's batch_norm + relu_ at (1024, 512)"]
    assert eval_relu["bound"].startswith("the floor:") and "at most 1.11x" in eval_relu["bound"]
    big = next(g for w, g in found.items() if "read/write floor" in w)
    assert big["value"] == pytest.approx(0.8)
    # forward at its floor's 50%, backward (6 s floor in 6 s) at 100%; two fresh outputs: 2 s
    assert big["bound"] == (
        "forward at 50% of its floor; backward at 100%; fresh output pages (y, dx) cost 2000 ms "
        "of its 10000 ms"
    )
    slow = {g["what"]: g for g in cpu.goals(_goal_cases(kernel_fb_image=2.5))}
    loops = slow["train fwd+bwd >= 2x torch at (32, 64, 56, 56)"]
    assert not loops["met"] and loops["bound"].startswith("the kernel's loops: 20% of its floor")
    versus = slow["train fwd+bwd >= 1x torch.compile(F.batch_norm) at (32, 64, 56, 56)"]
    assert not versus["met"] and "torch.compile reaches 33%" in versus["bound"]
    text = cpu.format_goals(cpu.goals(_goal_cases(kernel_fb_image=2.5)))
    assert "NOT met" in text and "bound: the kernel's loops" in text
    assert cpu.goals_text(cpu.goals(_goal_cases())).startswith("3 of 5 met; ")


def test_record_cpu_writes_one_figure_per_shape_and_layout_and_the_goals(
    monkeypatch, eager_compile
):
    from bnlab.teaching import results

    recorded = {}
    monkeypatch.setattr(
        results,
        "record",
        lambda key, value, what, text, table: recorded.update(
            {key: {"value": value, "text": text, "table": table}}
        ),
    )
    cases = cpu.measure_shape(
        (4, 3, 5, 5), "contiguous", repeats=1, bandwidths=BANDWIDTHS, compiled=True
    )
    facts = dict(
        allocator="default",
        threads=1,
        l2_bytes=2**21,
        llc_bytes=2**25,
        large_shape=[8, 3, 5, 5],
        first_touch_s=0.001,
        read_GBps=10.0,
        write_GBps=5.0,
        copy_GBps=6.0,
        numba_threading_layer="omp",
        numba_layer_requested="omp",
        torch_parallel_backend="OpenMP",
        per_call_s={},
    )
    cpu.record_cpu(cases, facts)
    assert set(recorded) == {
        "bench.cpu.default.machine",
        "bench.cpu.default.4x3x5x5",
        "bench.cpu.default.goals",
    }
    machine = recorded["bench.cpu.default.machine"]["text"]
    assert "threading layer omp" in machine and "copy 6.0 GB/s (copy counts 3 bytes" in machine
    entry = recorded["bench.cpu.default.4x3x5x5"]
    assert entry["table"] == "bench" and set(cpu.MODES) <= set(entry["value"])
    kernel = {c["mode"]: c for c in cases if c["impl"] == "bnlab kernel"}
    compiled = {c["mode"]: c for c in cases if c["impl"] == cpu.COMPILE}
    value = entry["value"]
    assert value["eval+relu"] == round(kernel["eval+relu"]["speedup_vs_torch"], 3)
    assert value["vs torch.compile"]["train fwd+bwd"] == round(
        compiled["train fwd+bwd"]["median_s"] / kernel["train fwd+bwd"]["median_s"], 3
    )
    assert value["floor_fraction"][cpu.COMPILE]["eval+relu"] == round(
        compiled["eval+relu"]["floor_fraction"], 3
    )
    assert set(value["compile_s"]) == set(cpu.COMPILED_MODES)
    assert "torch.compile" in entry["text"] and "of its floor" in entry["text"]
    data = {
        "figures": {
            k: {"value": v["value"], "text": v["text"], "recorded": "today"}
            for k, v in recorded.items()
        }
    }
    (row,) = cpu.stored_kernel_table(data)
    assert row["allocator"] == "default" and row["layout"] == "contiguous"
    table = cpu.format_stored_table(data)
    assert "fwd+bwd x compile" in table and "goals, default allocator:" in table


def test_allocator_setting_is_read_from_the_environment(monkeypatch):
    for key in cpu.WARM_ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cpu.allocator() == "default"
    for key, value in cpu.WARM_ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    assert cpu.allocator() == "warm"


def test_format_cases_shows_the_floor_where_measured():
    text = cpu.format_cases(
        cpu.measure_shape((4, 3), repeats=1, bandwidths=BANDWIDTHS, modes=("eval",))
    )
    assert "bnlab kernel" in text and "(4, 3)" in text and "%" in text and "floor ms" in text
