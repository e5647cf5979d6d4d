"""Data-parallel training with BN: per-replica statistics, SyncBatchNorm, and what they cost.

In data-parallel training (``torch.nn.parallel.DistributedDataParallel``, DDP) every rank
holds a copy of the model and takes its *shard* of each global batch; DDP all-reduces the
gradients, so the weights follow the gradient of the global batch's mean loss. Plain BN,
though, normalizes each shard with the shard's own statistics ("per-replica" BN): the
gradients see the global batch, the statistics only the replica's. SyncBatchNorm
(:mod:`bnlab.distributed.sync`) normalizes with the global batch's statistics instead.

- :func:`train_worker`: LeNet on Fashion-MNIST under DDP (gloo, CPU), rank r taking slice r
  of every global batch, with ``bn`` = "per-replica" or "sync"; test accuracy at evenly
  spaced steps (rank 0) and seconds per training step. In a group of one it is the
  single-process reference with the same global batch. :func:`train_runs`: several in one
  group (one spawn for a whole sweep).
- :func:`step_times`: per-replica and sync DDP timed side by side in one group, interleaved
  blocks of steps, medians: their ratio is what SyncBatchNorm costs per step;
  :func:`cost_worker` runs it and :func:`count_collectives` in one group, :func:`checks_worker`
  the tests' in-group facts.
- :func:`sync_bytes`: the bytes each rank hands to SyncBatchNorm's collectives per layer and
  training step, from the tensor sizes in ``sync.py``; :func:`count_collectives` counts the
  calls and bytes for real (it wraps ``torch.distributed``'s functions inside a group);
  :func:`gradient_bytes`: what DDP all-reduces per step for the weights.
- :func:`replica_moments`: each replica's per-channel mean and variance for a batch split
  into shards, the spread that per-replica BN normalizes with.
- :func:`accumulated_gradient`, :func:`accumulated_step`, :func:`gradient_mismatch`:
  gradient accumulation over micro-batches. BN normalizes each micro-batch with its own
  statistics, so the accumulated gradient is not the large batch's (it is ghost BN's,
  :mod:`bnlab.distributed.ghost`); with GroupNorm or LayerNorm it is the same gradient.

Serves notebook 09.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bnlab.config import seed_everything
from bnlab.distributed.sync import _HEADER, SyncBatchNorm
from bnlab.experiments import data as data_module
from bnlab.experiments import models, train
from bnlab.nn import functional as F

BN_MODES = ("per-replica", "sync")

#: the defaults of :func:`train_worker`'s config
DEFAULTS: dict = {
    "bn": "per-replica",  # or "sync"
    "per_replica_batch": 4,  # examples per rank per step; the global batch is world_size x this
    "epochs": 1,
    "lr": 0.05,
    "momentum": 0.9,  # SGD's
    "seed": 0,
    "n_train": 12000,
    "n_test": 2000,
    "activation": "relu",
    "evals": 4,  # test accuracy measured at this many evenly spaced steps (the last included)
    "data_seed": 0,  # which fixed subsets of Fashion-MNIST
}


def _config(config: dict | None) -> dict:
    unknown = set(config or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **(config or {})}
    if merged["bn"] not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES} (got {merged['bn']!r})")
    return merged


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of a global batch ``t`` (N divisible by world_size)."""
    if t.shape[0] % world_size:
        raise ValueError(f"a global batch of {t.shape[0]} does not split over {world_size} ranks")
    size = t.shape[0] // world_size
    return t[rank * size : (rank + 1) * size]


def build_model(bn: str, activation: str = "relu", seed: int = 0) -> nn.Module:
    """LeNet with torch's BN (Kaiming init for ReLU, Xavier otherwise), seeded; "sync" converts
    every BN to bnlab's SyncBatchNorm (plain BN outside a group of two or more)."""
    seed_everything(seed)
    net = models.lenet(bn="torch", activation=activation)
    net = models.init_kaiming(net) if activation == "relu" else models.init_xavier(net)
    return SyncBatchNorm.convert_sync_batchnorm(net) if bn == "sync" else net


def _global_batches(x: Tensor, y: Tensor, global_batch: int, seed: int):
    """Shuffled global batches (the same on every rank), the last incomplete one dropped."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x) - global_batch + 1, global_batch):
        idx = order[start : start + global_batch]
        yield x[idx], y[idx]


def train_worker(config: dict | None = None) -> dict:
    """Train one LeNet under DDP on this rank's shards; run by :func:`bnlab.distributed.launch.run`.

    config: keys of :data:`DEFAULTS`. Every rank draws the same global batches (seeded) and
    trains on its slice; DDP averages the gradients. Returns {"rank", "world_size", "bn",
    "global_batch", "steps", "eval_steps", "test_acc" (rank 0; None elsewhere),
    "seconds_per_step" (training only, evaluation excluded), "seed"}.
    """
    cfg = _config(config)
    rank, world = _rank_and_world()
    b = cfg["per_replica_batch"]
    global_batch = b * world
    x_train, y_train = data_module.subset(
        *data_module.load_tensors(True), cfg["n_train"], cfg["data_seed"]
    )
    x_test, y_test = data_module.subset(
        *data_module.load_tensors(False), cfg["n_test"], cfg["data_seed"]
    )
    test = data_module.TensorLoader(x_test, y_test, 500)
    net = build_model(cfg["bn"], cfg["activation"], cfg["seed"])
    model = DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    steps_per_epoch = len(x_train) // global_batch
    total = steps_per_epoch * cfg["epochs"]
    evals = max(1, min(cfg["evals"], total))
    eval_steps = sorted({round(total * (i + 1) / evals) for i in range(evals)})
    accuracies, train_seconds, step = [], 0.0, 0
    model.train()
    for epoch in range(cfg["epochs"]):
        seed = cfg["seed"] * 1000 + epoch
        for xb, yb in _global_batches(x_train, y_train, global_batch, seed):
            start = time.perf_counter()
            train.train_step(model, opt, shard(xb, rank, world), shard(yb, rank, world))
            train_seconds += time.perf_counter() - start
            step += 1
            if step in eval_steps and rank == 0:
                accuracies.append(train.accuracy(net, test))
    return {
        "rank": rank,
        "world_size": world,
        "bn": cfg["bn"],
        "seed": cfg["seed"],
        "global_batch": global_batch,
        "steps": total,
        "eval_steps": eval_steps,
        "test_acc": accuracies if rank == 0 else None,
        "seconds_per_step": train_seconds / max(total, 1),
    }


def train_runs(configs: list[dict]) -> list[dict]:
    """:func:`train_worker` for each config in turn, in one group (one spawn for a sweep)."""
    return [train_worker(c) for c in configs]


def step_times(config: dict | None = None, steps: int = 20, rounds: int = 5) -> dict:
    """Seconds per DDP training step, per-replica BN vs SyncBatchNorm, timed side by side.

    Both models train in the same group on the same shards; ``rounds`` alternating blocks of
    ``steps`` steps each (the order flips every round), after one untimed block each. Returns
    {"per-replica": median s/step, "sync": median s/step, "ratio": sync / per-replica,
    "blocks": {mode: [s/step of each block]}}; every rank returns its own timings.
    """
    cfg = _config(config)
    rank, world = _rank_and_world()
    b = cfg["per_replica_batch"]
    x, y = data_module.subset(*data_module.load_tensors(True), b * world * steps, 0)
    batches = [
        (shard(xb, rank, world), shard(yb, rank, world))
        for xb, yb in _global_batches(x, y, b * world, cfg["seed"])
    ]
    runners = {}
    for mode in BN_MODES:
        net = build_model(mode, cfg["activation"], cfg["seed"])
        model = DistributedDataParallel(net) if world > 1 else net
        runners[mode] = (model, torch.optim.SGD(model.parameters(), lr=cfg["lr"]))

    def block(mode: str) -> float:
        model, opt = runners[mode]
        start = time.perf_counter()
        for xb, yb in batches:
            train.train_step(model, opt, xb, yb)
        return (time.perf_counter() - start) / len(batches)

    for mode in BN_MODES:
        block(mode)  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in BN_MODES}
    for r in range(rounds):
        for mode in BN_MODES if r % 2 == 0 else BN_MODES[::-1]:
            times[mode].append(block(mode))
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return {**medians, "ratio": medians["sync"] / medians["per-replica"], "blocks": times}


# ---------------------------------------------------------------------------------
# Bytes on the wire
# ---------------------------------------------------------------------------------


def sync_bytes(num_features: int, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes each rank hands to SyncBatchNorm's collectives, per layer and training step.

    From ``bnlab/distributed/sync.py``: forward, one all_gather of the int64 header
    (``len(_HEADER)`` = 5 values) and one all_gather of the packed float64
    ``[count, mean (C), M2 (C)]``; backward, one all_reduce of ``[sum(dy) (C),
    sum(dy * x_hat) (C)]`` in the input's dtype. (What crosses the network also depends on
    the world size and on the collective's algorithm; these are the tensors' sizes.)
    """
    c = num_features
    itemsize = torch.empty((), dtype=dtype).element_size()
    parts = {
        "header": len(_HEADER) * 8,
        "statistics": (1 + 2 * c) * 8,
        "backward": 2 * c * itemsize,
    }
    return {**parts, "total": sum(parts.values())}


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients DDP all-reduces per step: every parameter that requires grad."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


_COUNTED = ("all_gather", "all_reduce", "all_gather_object", "broadcast", "all_to_all")


def _payload(name: str, args: tuple) -> int:
    """Bytes this rank contributes to a collective call."""
    if name == "all_gather":
        return args[1].numel() * args[1].element_size()
    if name == "all_reduce":
        return args[0].numel() * args[0].element_size()
    return 0


def count_collectives(num_features: int = 6, batch: int = 4, dtype_name: str = "float32") -> dict:
    """One SyncBatchNorm2d forward and backward on this rank, counting every collective call.

    Wraps ``torch.distributed``'s collectives (sync.py calls them through the module) while
    the layer runs, then restores them. Returns {"forward": [(name, bytes), ...],
    "backward": [...]}: what this rank contributed to each call.
    """
    dtype = getattr(torch, dtype_name)
    calls: list[tuple[str, int]] = []
    originals: dict[str, Callable] = {name: getattr(dist, name) for name in _COUNTED}

    def counting(name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            calls.append((name, _payload(name, args)))
            return fn(*args, **kwargs)

        return wrapped

    layer = SyncBatchNorm(num_features, dtype=dtype)
    x = torch.randn(batch, num_features, 3, 3, dtype=dtype, requires_grad=True)
    try:
        for name, fn in originals.items():
            setattr(dist, name, counting(name, fn))
        out = layer(x)
        forward = list(calls)
        calls.clear()
        out.backward(torch.randn_like(out))
        backward = list(calls)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"forward": forward, "backward": backward}


def cost_worker(
    num_features: int = 6, config: dict | None = None, steps: int = 20, rounds: int = 5
) -> dict:
    """What SyncBatchNorm costs, in one group: {"collectives": :func:`count_collectives` for a
    ``num_features`` layer (float32, 4 examples), "step_times": :func:`step_times`}."""
    return {
        "collectives": count_collectives(num_features, 4),
        "step_times": step_times(config, steps, rounds),
    }


def checks_worker(config: dict | None = None) -> dict:
    """The in-group facts of the tests, in one group (one spawn): two tiny training runs
    (per-replica and sync), a short :func:`cost_worker`, and :func:`count_collectives` in
    float32 and float64 for a 6-channel layer."""
    config = config or {}
    return {
        "runs": train_runs([{**config, "bn": mode} for mode in BN_MODES]),
        "cost": cost_worker(6, config, steps=2, rounds=2),
        "collectives": {d: count_collectives(6, 3, d) for d in ("float32", "float64")},
    }


# ---------------------------------------------------------------------------------
# Per-replica statistics
# ---------------------------------------------------------------------------------


def replica_moments(x: Tensor, per_replica: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of each contiguous shard of ``per_replica`` examples.

    x: (N, C, *) with N divisible by ``per_replica``. Returns two (N // per_replica, C) tensors:
    the statistics per-replica BN normalizes each shard with.
    """
    if per_replica < 1 or x.shape[0] % per_replica:
        raise ValueError(f"{x.shape[0]} examples do not split into shards of {per_replica}")
    shards = x.reshape(x.shape[0] // per_replica, per_replica, *x.shape[1:])
    dims = tuple(d + 1 for d in F.reduce_dims(x))
    return shards.mean(dim=dims), shards.var(dim=dims, unbiased=False)


# ---------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------


def _accumulate(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int) -> float:
    """Backward of the global batch's mean loss, one micro-batch at a time; the loss."""
    if micro_batches < 1 or len(x) % micro_batches:
        raise ValueError(f"a batch of {len(x)} does not split into {micro_batches} micro-batches")
    total = 0.0
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        loss = nn.functional.cross_entropy(model(xs), ys, reduction="sum") / len(x)
        loss.backward()
        total += loss.item()
    return total


def accumulated_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    micro_batches: int,
) -> float:
    """One optimizer step on ``batch`` = (x, y), its gradient accumulated over micro-batches.

    Clears the gradients, runs ``micro_batches`` forwards and backwards (each micro-batch's
    summed loss divided by the whole batch's size, so the gradients add up to the mean
    loss's), then ``optimizer.step()``. Returns the batch's mean loss. BN layers in training
    mode see each micro-batch's statistics, and update their running statistics once per
    micro-batch.
    """
    x, y = batch
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = _accumulate(model, x, y, micro_batches)
    optimizer.step()
    return loss


def accumulated_gradient(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int) -> Tensor:
    """The flat gradient (every parameter, in order) that accumulation over ``micro_batches``
    gives, in training mode; ``micro_batches=1`` is the large batch's. The model is untouched
    (a copy runs)."""
    probe = copy.deepcopy(model).train()
    probe.zero_grad(set_to_none=True)
    _accumulate(probe, x, y, micro_batches)
    return torch.cat([p.grad.reshape(-1) for p in probe.parameters() if p.grad is not None])


def gradient_mismatch(model: nn.Module, x: Tensor, y: Tensor, micro_batches: int) -> float:
    """||g_accumulated - g_large_batch|| / ||g_large_batch||, both from the same weights."""
    large = accumulated_gradient(model, x, y, 1)
    accumulated = accumulated_gradient(model, x, y, micro_batches)
    return ((accumulated - large).norm() / large.norm()).item()
