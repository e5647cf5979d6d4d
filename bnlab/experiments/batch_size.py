"""Training at many batch sizes with the same number of steps (notebooks 06 and 08).

How a normalization copes with small batches is measured here with one protocol, so that
notebook 06 (BN and its remedies) and notebook 08 (the normalization family) report
numbers that mean the same thing. One run:

1. seed everything with the run's seed and build the model;
2. make ``steps`` SGD steps, each on ``b`` images drawn at random with replacement from the
   training set (:class:`bnlab.experiments.train.RandomBatches`, seeded with the run's
   seed: the same batches for every arm with that seed and batch size), at the learning
   rate ``lr_of(b)``; after half of them, ``midway(model)`` if given (Batch Renorm relaxes
   its limits there);
3. measure test accuracy once, in eval mode.

Every batch size gets the same number of optimizer steps, so a large batch sees more
images; the protocol compares normalizations at a given batch size (the same steps, the
same images, the same learning rate for every arm), not batch sizes with each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from bnlab.config import pick, seed_everything
from bnlab.experiments.data import fashion_mnist
from bnlab.experiments.train import (
    ProgressBar,
    RandomBatches,
    accuracy,
    flush_denormals,
    train_steps,
)


def protocol_data() -> tuple[torch.Tensor, torch.Tensor, Iterable]:
    """The protocol's images: (x_train, y_train, test batches), the same in 06 and 08.

    6000 training images (1536 in FAST mode) and 2000 test images (1000), fixed draws.
    """
    d = fashion_mnist(batch_size=256, n_train=pick(1536, 6000), n_test=pick(1000, 2000))
    return d.train.x, d.train.y, d.test


def protocol_steps() -> int:
    """SGD steps per run: 600 (100 in FAST mode), at every batch size."""
    return pick(100, 600)


def protocol_lr(batch_size: int) -> float:
    """0.05 per 16 images, linear in the batch size up to 64 (the rule Wu & He 2018 use
    for GroupNorm vs BatchNorm: the learning rate scales with the batch), the same for
    every arm."""
    return 0.05 * min(batch_size, 64) / 16


def equal_steps_run(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    test: Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    steps: int,
    lr: float,
    seed: int,
    midway: Callable[[nn.Module], object] | None = None,
) -> float:
    """One run of the protocol above; its test accuracy.

    x (N, ...), y (N,): the training images and labels; test: batches of (x, y).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (got {steps})")
    seed_everything(seed)
    model = make_model()
    first = steps // 2
    halves = [
        RandomBatches(x, y, batch_size, first, seed),
        RandomBatches(x, y, batch_size, steps - first, seed + 10_000),
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with flush_denormals():
        train_steps(model, optimizer, halves[0], progress=False)
        if midway is not None:
            midway(model)
        train_steps(model, optimizer, halves[1], progress=False)
    return accuracy(model, test)


def batch_size_curve(
    makers: dict[str, Callable[[], nn.Module]],
    batch_sizes: Sequence[int],
    seeds: Sequence[int],
    midway: dict[str, Callable[[nn.Module], object]] | None = None,
    steps: int | None = None,
    data: tuple[torch.Tensor, torch.Tensor, Iterable] | None = None,
    lr_of: Callable[[int], float] = protocol_lr,
    progress: bool = True,
    desc: str = "batch sizes",
) -> dict[tuple[str, int], list[float]]:
    """Every arm of ``makers`` at every batch size and seed, with :func:`equal_steps_run`.

    makers: arm name -> a function building a fresh model; midway: arm name -> its
    mid-training call. steps, data, lr_of: the protocol's (:func:`protocol_steps`,
    :func:`protocol_data`, :func:`protocol_lr`) unless given; the learning rate is the same
    for every arm at a batch size.
    Returns (arm, batch size) -> test accuracy per seed, in seed order: at one batch size the
    same seed gives every arm the same batches, so arms pair by seed.
    """
    midway = midway or {}
    steps = protocol_steps() if steps is None else steps
    x, y, test = protocol_data() if data is None else data
    results: dict[tuple[str, int], list[float]] = {}
    total = len(batch_sizes) * len(makers) * len(seeds)
    bar = ProgressBar(total=total, desc=desc, disable=not progress)
    for b in batch_sizes:
        for name, make in makers.items():
            results[name, b] = []
            for seed in seeds:
                acc = equal_steps_run(make, x, y, test, b, steps, lr_of(b), seed, midway.get(name))
                results[name, b].append(acc)
                bar.update()
    bar.close()
    return results
