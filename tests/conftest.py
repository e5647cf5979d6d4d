"""Shared test settings."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The unit tests use tiny tensors: on a busy 2-core machine, thread hand-offs cost
    # more than the arithmetic (measured ~10x slower with 2 threads under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter):
    """Report the largest difference from torch.nn that test_modules saw, per dtype."""
    seen = getattr(sys.modules.get("test_modules"), "MAX_DIFF", None)
    if seen and any(seen.values()):
        report = ", ".join(f"{dtype}: {diff:.1e}" for dtype, diff in seen.items())
        terminalreporter.write_line(f"largest |bnlab - torch.nn| in test_modules: {report}")
