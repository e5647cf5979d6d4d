"""bnlab.config: FAST mode from the environment, seeding, device choice."""

from __future__ import annotations

import pytest
import torch

from bnlab import config


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"BNLAB_FAST": "1"}, True),
        ({"BNLAB_FAST": "0", "CI": "true"}, False),  # explicit wins: make notebooks under CI
        ({"BNLAB_FAST": "yes"}, True),
        ({"BNLAB_FAST": ""}, False),
    ],
)
def test_fast_mode(monkeypatch, env, expected):
    monkeypatch.delenv("BNLAB_FAST", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert config.fast_mode() is expected
    assert config.pick("fast", "full") == ("fast" if expected else "full")


def test_bad_fast_value(monkeypatch):
    monkeypatch.setenv("BNLAB_FAST", "maybe")
    with pytest.raises(ValueError, match="BNLAB_FAST must be 0 or 1"):
        config.fast_mode()


def test_seed_everything_repeats():
    config.seed_everything(3)
    a = torch.randn(4)
    gen = config.seed_everything(3)
    assert torch.equal(a, torch.randn(4))
    expected = torch.randn(2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.randn(2, generator=gen), expected)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("BNLAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.device().type == expected
    assert config.device("cpu") == torch.device("cpu")
    monkeypatch.setenv("BNLAB_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_requested_without_gpu(monkeypatch):
    monkeypatch.setenv("BNLAB_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        config.device()
