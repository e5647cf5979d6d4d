"""Small builders shared by several test files (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from bnlab.config import seed_everything
from bnlab.experiments.models import lenet

BN_KINDS = ["torch", "bnlab"]


def bn_lenet(bn: str = "torch") -> nn.Sequential:
    """LeNet with BN after each layer and ReLU, seeded."""
    seed_everything(0)
    return lenet(bn=bn, activation="relu")


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """n random (1, 28, 28) images in [0, 1)."""
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def warm_up(model: nn.Module, steps: int = 3) -> None:
    """A few train-mode forwards so the running statistics are not the initial 0 / 1."""
    model.train()
    with torch.no_grad():
        for s in range(steps):
            model(images(32, seed=100 + s) * 2 + 0.5)


def codes(findings) -> list[str]:
    """The sorted codes of a list of doctor findings."""
    return sorted(f.code for f in findings)


# Property-based tests: a quick, derandomized profile in `make test`, thousands of examples
# in `make test-deep` (HYPOTHESIS_PROFILE=deep). Tests apply it with @PROPERTY_SETTINGS:
# torch's test utilities load a profile of their own when imported, so the default
# profile cannot be relied on.
settings.register_profile("quick", max_examples=40, derandomize=True, deadline=None)
settings.register_profile(
    "deep", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROPERTY_SETTINGS = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick")))

# Checks that take seconds each (fresh processes, the CUDA simulator's slow threads) run a
# representative subset in `make test` and all of their cases in `make test-deep`.
DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
deep_only = pytest.mark.skipif(not DEEP, reason="runs in make test-deep (HYPOTHESIS_PROFILE=deep)")


# apt-get is never run for real: a stand-in logs its arguments to <folder>/log. "install"
# fails until "update" ran; with <folder>/hang present it starts a child (as apt-get starts
# dpkg), writes both pids to <folder>/pids and both wait, logging "finished" if not stopped.
FAKE_APT_GET = """#!/bin/sh
echo "$*" >> "$FAKE_APT_DIR/log"
if [ -e "$FAKE_APT_DIR/hang" ]; then
  echo $$ >> "$FAKE_APT_DIR/pids"
  sleep 60 &
  echo $! >> "$FAKE_APT_DIR/pids"
  wait
  echo finished >> "$FAKE_APT_DIR/log"
  exit 0
fi
case "$*" in
  *update*) : > "$FAKE_APT_DIR/updated" ;;
  *install*) [ -e "$FAKE_APT_DIR/updated" ] || {
    echo "E: Unable to locate package" >&2; exit 100; } ;;
esac
"""


def fake_apt_get(folder) -> dict[str, str]:
    """Write the apt-get stand-in into ``folder``; the environment variable it reads."""
    (folder / "apt-get").write_text(FAKE_APT_GET)
    (folder / "apt-get").chmod(0o755)
    return {"FAKE_APT_DIR": str(folder)}


def apt_calls(folder) -> list[str]:
    """The argument lines the apt-get stand-in in ``folder`` logged, in order."""
    log = folder / "log"
    return log.read_text().splitlines() if log.exists() else []


def gone(pids: list[int], wait: float = 5.0) -> bool:
    """Whether every pid has exited (zombies count as gone), waiting up to ``wait`` seconds."""
    import time

    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    end = time.monotonic() + wait
    while any(alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)
