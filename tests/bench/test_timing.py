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
