"""bnlab.distributed.equality: SyncBatchNorm over ranks equals BatchNorm over the whole batch.

World size 2 runs in `make test`; world size 4 only in `make test-deep`
(HYPOTHESIS_PROFILE=deep), every case in one spawned group each.
"""

from __future__ import annotations

import os

import pytest
import torch

from bnlab.distributed import equality

DEEP = os.environ.get("HYPOTHESIS_PROFILE") == "deep"


def test_every_combination_is_a_case():
    cases = equality.cases()
    assert len(cases) == len(set(cases)) == 4 * 2 * 2 * 2 * 2


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_split_is_uneven_random_and_can_leave_one_rank_empty(world_size):
    gen = torch.Generator().manual_seed(0)
    for total in range(world_size, world_size + 12):
        full = equality.split(total, world_size, False, gen)
        assert sum(full) == total and min(full) >= 1
        empty = equality.split(total, world_size, True, gen)
        assert sum(empty) == total and sorted(empty)[:2] == [0, min(s for s in empty if s)]
        assert empty.count(0) == 1


def _check(summary: dict, world_size: int) -> None:
    assert summary["world_size"] == world_size and summary["cases"] == 64
    assert summary["passed"], summary["failures"][:5]
    for dtype, errors in summary["max_error"].items():
        assert set(errors) == set(equality.QUANTITIES)
        assert max(errors.values()) <= equality.TOLERANCE[dtype], (dtype, errors)


def test_world_size_2_every_case_equals_torch_batchnorm():
    _check(equality.prove(2, timeout=120, quiet=True), 2)


@pytest.mark.skipif(
    not DEEP, reason="world size 4 runs in make test-deep (HYPOTHESIS_PROFILE=deep)"
)
def test_world_size_4_every_case_equals_torch_batchnorm():
    _check(equality.prove(4, timeout=240, quiet=True), 4)
