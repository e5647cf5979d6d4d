"""bnlab.bench.tables, make bench's driver: both sides get the same threads."""

from __future__ import annotations

import numba
import torch

from bnlab.bench import tables


def test_set_threads_gives_torch_and_numba_the_same_count():
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        for n in (2, 1):
            tables.set_threads(n)
            assert (torch.get_num_threads(), numba.get_num_threads()) == (n, n)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
