"""bnlab.distributed.ddp: DDP training at world size 2, bytes counted, accumulation's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlab.distributed import ddp, launch
from bnlab.distributed.ghost import convert_ghost_batchnorm
from bnlab.experiments import models

TINY = {"n_train": 64, "n_test": 100, "evals": 2, "per_replica_batch": 4}


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def in_group():
    """checks_worker's findings on each of two spawned gloo ranks (one group for them all)."""
    return launch.run(2, ddp.checks_worker, TINY, timeout=120)


def test_training_at_world_size_two_per_replica_and_sync(in_group):
    for mode, r0, r1 in zip(ddp.BN_MODES, in_group[0]["runs"], in_group[1]["runs"], strict=True):
        assert r0["bn"] == r1["bn"] == mode and r0["world_size"] == 2 and r0["global_batch"] == 8
        assert r0["steps"] == 64 // 8 and r0["eval_steps"] == [4, 8]
        assert len(r0["test_acc"]) == 2 and all(0 <= a <= 1 for a in r0["test_acc"])
        assert r1["test_acc"] is None and r0["seconds_per_step"] > 0


def test_without_a_group_it_is_the_single_process_reference():
    single = ddp.train_worker({**TINY, "per_replica_batch": 8, "bn": "sync"})
    assert single["world_size"] == 1 and single["global_batch"] == 8 and single["steps"] == 8
    assert len(single["test_acc"]) == 2


def test_step_times_returns_both_modes_and_their_ratio(in_group):
    found = in_group[0]["cost"]["step_times"]
    assert set(found["blocks"]) == set(ddp.BN_MODES)
    assert found["ratio"] == pytest.approx(found["sync"] / found["per-replica"])
    assert all(len(t) == 2 and min(t) > 0 for t in found["blocks"].values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sync_bytes_are_what_the_collectives_are_handed(in_group, dtype):
    want = ddp.sync_bytes(6, getattr(torch, dtype))
    for rank in in_group:  # every rank: header and statistics gathered, one all_reduce back
        counted = rank["collectives"][dtype]
        assert counted["forward"] == [
            ("all_gather", want["header"]),
            ("all_gather", want["statistics"]),
        ]
        assert counted["backward"] == [("all_reduce", want["backward"])]
    assert want["total"] == 40 + 8 * 13 + 12 * (4 if dtype == "float32" else 8)
    if dtype == "float32":  # cost_worker counts a float32 layer of 4 examples
        assert in_group[0]["cost"]["collectives"] == in_group[0]["collectives"][dtype]


def test_gradient_bytes_count_the_parameters():
    assert ddp.gradient_bytes(models.lenet(bn="torch")) == 4 * (61706 + 2 * 226)


def test_shard_and_replica_moments():
    x = torch.arange(24.0).reshape(6, 2, 2)
    assert ddp.shard(x, 1, 3).tolist() == x[2:4].tolist()
    with pytest.raises(ValueError, match="split"):
        ddp.shard(x, 0, 4)
    means, variances = ddp.replica_moments(x, 3)
    assert means.shape == (2, 2)
    torch.testing.assert_close(means[1], x[3:].transpose(0, 1).reshape(2, -1).mean(1))
    torch.testing.assert_close(
        variances[0], x[:3].transpose(0, 1).reshape(2, -1).var(1, unbiased=False)
    )


def test_config_keys_are_checked():
    with pytest.raises(ValueError, match="unknown"):
        ddp.train_worker({"batch": 4})
    with pytest.raises(ValueError, match="bn must be"):
        ddp.train_worker({"bn": "ghost"})


def test_accumulation_with_bn_is_ghost_bn_not_the_large_batch():
    x, y = _batch()
    net = ddp.build_model("per-replica")
    assert ddp.gradient_mismatch(net, x, y, 1) == 0.0
    assert ddp.gradient_mismatch(net, x, y, 4) > 0.1
    ghost = convert_ghost_batchnorm(copy.deepcopy(net), 8)
    want = ddp.accumulated_gradient(ghost, x, y, 1)
    got = ddp.accumulated_gradient(net, x, y, 4)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_accumulation_without_bn_is_the_large_batch():
    x, y = _batch()
    net = models.with_group_norm(ddp.build_model("per-replica"))
    assert ddp.gradient_mismatch(net, x, y, 8) < 1e-5


def test_accumulated_step_steps_once_with_the_accumulated_gradient():
    x, y = _batch(16)
    net = models.with_group_norm(ddp.build_model("per-replica"))
    ref = copy.deepcopy(net)
    ddp.accumulated_step(net, torch.optim.SGD(net.parameters(), lr=0.1), (x, y), 4)
    loss = nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="micro-batches"):
        ddp.accumulated_step(net, torch.optim.SGD(net.parameters(), lr=0.1), (x, y), 3)
