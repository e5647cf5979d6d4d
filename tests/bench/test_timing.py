"""bnlab.bench.timing: interleaved timing; the profiler's operator split, quietly."""

from __future__ import annotations

import os

import torch
from torch import nn

from bnlab.bench import timing


def test_kineto_lines_are_dropped_and_other_stderr_passes(capfd):
    with timing.without_kineto_chatter():
        os.write(2, b"USDT:2026-11-23 20:00:01 11426:11426 SyncActivityProfilerHandler.cpp:39] x\n")
        os.write(2, b"ERROR:2026-11-23 20:00:02 11426:11426 DeviceProperties.cpp:56] gpu\n")
        os.write(2, b"a real problem\n")
    err = capfd.readouterr().err
    assert err == "a real problem\n"


def test_operator_shares_split_one_forward_pass(capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    shares = timing.operator_shares(model, torch.randn(2, 3, 16, 16))
    assert set(shares) == {"batch_norm", "conv", "other"}
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert shares["conv"] > 0 and shares["batch_norm"] > 0
    assert capfd.readouterr().err == ""  # the profiler's C++ log lines did not leak


def test_time_interleaved_rotates_the_order_and_counts_every_call():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = timing.time_interleaved(fns, repeats=3, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # warm-up
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    medians = timing.median_times(fns, repeat=2)
    assert set(medians) == {"a", "b", "c"}


def test_denormal_times_measures_three_variants():
    seconds = timing.denormal_times(n=1000, repeats=2)
    assert set(seconds) == {"normal", "subnormal", "flushed"} and min(seconds.values()) > 0
    assert torch.tensor(1e-39) * 0.5 != 0  # the flag was switched back off
