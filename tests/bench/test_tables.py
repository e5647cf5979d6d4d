"""bnlab.bench.tables, make bench's driver: what it states about the machine."""

from __future__ import annotations

from bnlab.bench import tables


def test_cpu_model_and_threads_are_stated(capsys):
    assert tables.cpu_model()
    tables.set_threads(1)
    import numba
    import torch

    assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
