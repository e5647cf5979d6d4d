"""bnlab.bench.cases: the case schema shared by make bench and make bench-gpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bnlab.bench import cases


def _m(median, iqr=0.1, n=5):
    return SimpleNamespace(median=median, iqr=iqr, times=[median] * n)


def test_cases_from_counts_the_minimum_passes_and_divides_by_torch():
    measured = {
        "train fwd+bwd": {"torch": _m(2.0), "bnlab kernel": _m(1.0)},
        "eval": {"torch": _m(1.0)},
    }
    found = cases.cases_from(measured, (2, 3, 4), "contiguous", "cpu", limit_GBps=1e-9, threads=2)
    kernel = next(c for c in found if c["impl"] == "bnlab kernel")
    assert kernel["speedup_vs_torch"] == 2.0 and kernel["passes"] == 8 and kernel["threads"] == 2
    assert kernel["bandwidth_GBps"] == pytest.approx(8 * 24 * 4 / 1.0 / 1e9)
    assert kernel["bandwidth_fraction"] == pytest.approx(kernel["bandwidth_GBps"] / 1e-9)
    assert kernel["repeats"] == 5 and kernel["dtype"] == "float32"
    (ev,) = [c for c in found if c["mode"] == "eval"]
    assert ev["passes"] == 2 and ev["speedup_vs_torch"] == 1.0
    no_limit = cases.cases_from(measured, (2, 3, 4), "contiguous", "cpu", limit_GBps=None)
    assert all(c["bandwidth_fraction"] is None for c in no_limit)
    assert cases.PASSES == {"train fwd": 3, "train fwd+bwd": 8, "eval": 2, "eval+relu": 2}


def test_format_goals_says_met_not_met_and_not_measured():
    text = cases.format_goals([
        {"what": "a", "value": 2.0, "met": True},
        {"what": "b", "value": 0.5, "met": False},
        {"what": "c", "value": None, "met": False},
    ])  # fmt: skip
    assert text.splitlines() == ["met      a: 2.00", "NOT met  b: 0.50", "NOT met  c: not measured"]


def test_cases_from_adds_the_read_write_floor_when_bandwidths_are_given():
    measured = {"train fwd+bwd": {"torch": _m(2.0), "bnlab kernel": _m(1.0)}}
    bandwidths = {"read_GBps": 1e-9, "write_GBps": 0.5e-9}  # 1 byte/s read, 0.5 written
    blocked = cases.cases_from(
        measured, (1, 2, 3, 4), "contiguous", "cpu", None, bandwidths=bandwidths
    )
    kernel = next(c for c in blocked if c["impl"] == "bnlab kernel")
    nbytes = 24 * 4
    assert kernel["traffic"] == "blocked"
    assert kernel["floor_s"] == pytest.approx(
        3 * nbytes / 1.0 + 2 * nbytes / 0.5
    )  # 3 reads, 2 writes
    assert kernel["floor_unblocked_s"] == pytest.approx(6 * nbytes + 2 * nbytes / 0.5)
    assert kernel["floor_fraction"] == pytest.approx(kernel["floor_s"] / 1.0)
    rows = cases.cases_from(
        measured, (1, 2, 3, 4), "channels_last", "cpu", None, bandwidths=bandwidths
    )
    assert all(c["traffic"] == "unblocked" and c["floor_s"] == c["floor_unblocked_s"] for c in rows)


def test_format_goals_gives_the_bound_of_a_miss_only():
    text = cases.format_goals([
        {"what": "a", "value": 2.0, "met": True, "bound": "never shown"},
        {"what": "b", "value": 0.5, "met": False, "bound": "the floor"},
    ])  # fmt: skip
    assert text.splitlines() == [
        "met      a: 2.00",
        "NOT met  b: 0.50",
        "         bound: the floor",
    ]
