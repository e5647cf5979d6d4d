"""bnlab.experiments.batch_size: the equal-steps protocol of notebooks 06 and 08."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.experiments import batch_size


def tiny_task(n: int = 64):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 2.0 * y[:, None]
    return x, y, [(x, y)]


def make():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_a_run_makes_exactly_its_steps_calls_midway_once_and_repeats_with_its_seed():
    x, y, test = tiny_task()
    seen = []
    counting = lambda m: seen.append(int(m[1].num_batches_tracked))  # noqa: E731
    acc = batch_size.equal_steps_run(make, x, y, test, 4, 10, 0.1, seed=3, midway=counting)
    assert seen == [5]  # half of the 10 steps, then the midway call
    assert 0.0 <= acc <= 1.0
    assert batch_size.equal_steps_run(make, x, y, test, 4, 10, 0.1, seed=3) == acc
    with pytest.raises(ValueError, match="steps"):
        batch_size.equal_steps_run(make, x, y, test, 4, 1, 0.1, seed=0)


def test_the_curve_runs_every_arm_batch_size_and_seed_with_the_same_steps():
    x, y, test = tiny_task()
    steps = {}

    def tracked(name):
        def build():
            model = make()
            steps.setdefault(name, []).append(model)
            return model

        return build

    curve = batch_size.batch_size_curve(
        {"a": tracked("a"), "b": tracked("b")}, [2, 8], [0, 1], steps=6, data=(x, y, test),
        progress=False,
    )  # fmt: skip
    assert sorted(curve) == [("a", 2), ("a", 8), ("b", 2), ("b", 8)]
    assert all(len(v) == 2 for v in curve.values())
    assert {int(m[1].num_batches_tracked) for ms in steps.values() for m in ms} == {6}


def test_the_protocols_learning_rate_scales_with_the_batch_up_to_64():
    assert batch_size.protocol_lr(16) == pytest.approx(0.05)
    assert batch_size.protocol_lr(2) == pytest.approx(0.00625)
    assert batch_size.protocol_lr(128) == batch_size.protocol_lr(64) == pytest.approx(0.2)
