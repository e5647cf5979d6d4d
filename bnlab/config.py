"""Run-wide settings: FAST mode, seeding, and device choice.

FAST mode shrinks data, epochs and sizes so that every notebook runs in under a
minute on two CPU cores. It is on when ``BNLAB_FAST`` is a true value, or when
``BNLAB_FAST`` is unset and ``CI`` is set (CI runs the course in FAST mode). An
explicit ``BNLAB_FAST=0`` wins over ``CI``, so ``make notebooks`` can run in full.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def fast_mode() -> bool:
    """Whether FAST mode is on, read from the environment at each call."""
    flag = os.environ.get("BNLAB_FAST")
    if flag is not None:
        value = flag.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ValueError(f"BNLAB_FAST must be 0 or 1 (got {flag!r})")
    return bool(os.environ.get("CI"))


def pick(fast, full):
    """Return ``fast`` in FAST mode, else ``full``: the one place sizes are chosen."""
    return fast if fast_mode() else full


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a seeded torch Generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``BNLAB_DEVICE`` or ``prefer`` if given, else CUDA when present."""
    name = prefer or os.environ.get("BNLAB_DEVICE")
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} was requested but no CUDA GPU is visible to torch; "
                "unset BNLAB_DEVICE or install a CUDA build of torch"
            )
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
