"""The proof that SyncBatchNorm over ranks is BatchNorm over the concatenated batch.

:func:`equality_worker` runs inside a spawned group (:func:`bnlab.distributed.launch.run`)
and goes through EVERY combination of

- input rank: (N, C) and (N, C, L) for BatchNorm1d, (N, C, H, W), (N, C, D, H, W);
- affine on and off; momentum 0.1 and None (cumulative average); float32 and float64;
- the split of the global batch: random uneven slices, or random uneven slices with one
  rank holding N = 0 (the others at least 1, so the global batch always has N > 1),

64 cases per world size. Each case runs two training steps (a new global batch and a new
split each, a random upstream gradient) and one eval pass, and compares with single-process
``torch.nn.BatchNorm1d/2d/3d`` over the concatenated batch: outputs, input gradients,
parameter gradients summed over ranks, running statistics after both steps (and that they
are bit-identical on every rank), eval outputs. Errors are
``max|sync - torch| / max(1, max|torch|)``; tolerances 1e-10 (float64) and 1e-5 (float32).

:func:`prove` launches one group for all the cases and prints the count. :func:`checks_worker`
gathers the other in-group facts the tests and notebook show: mismatched ranks raise on
every rank, eval mode needs no communication, and torch's own SyncBatchNorm refuses CPU input.

Serves notebook 09.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.distributed.launch import run
from bnlab.distributed.sync import SyncBatchNorm

#: input kind -> (torch's reference class, number of axes after C)
KINDS: dict[str, tuple[type[nn.Module], int]] = {
    "(N,C)": (nn.BatchNorm1d, 0),
    "(N,C,L)": (nn.BatchNorm1d, 1),
    "(N,C,H,W)": (nn.BatchNorm2d, 2),
    "(N,C,D,H,W)": (nn.BatchNorm3d, 3),
}
DTYPES = (torch.float32, torch.float64)
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
QUANTITIES = ("output", "input_grad", "param_grad", "running_stats", "eval_output")
SPLITS = ("uneven", "uneven, one rank empty")


def cases() -> list[tuple[str, bool, float | None, torch.dtype, str]]:
    """Every (kind, affine, momentum, dtype, split) combination, in a fixed order."""
    return list(itertools.product(KINDS, (True, False), (0.1, None), DTYPES, SPLITS))


def split(total: int, world_size: int, empty: bool, gen: torch.Generator) -> list[int]:
    """Random sizes summing to ``total``, each >= 1, except one random rank at 0 if ``empty``."""
    holders = list(range(world_size))
    if empty:
        holders.pop(int(torch.randint(world_size, (1,), generator=gen)))
    cuts = torch.randperm(total - 1, generator=gen)[: len(holders) - 1] + 1
    edges = [0, *sorted(cuts.tolist()), total]
    sizes = [0] * world_size
    for rank, lo, hi in zip(holders, edges[:-1], edges[1:], strict=True):
        sizes[rank] = hi - lo
    return sizes


def _error(got: Tensor, want: Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    scale = max(1.0, want.abs().max().item())
    return (got.double() - want.double()).abs().max().item() / scale


def run_case(kind, affine, momentum, dtype, split_kind, gen) -> dict[str, float]:
    """One combination on this rank: its errors per quantity (its own slice's)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    reference_cls, spatial = KINDS[kind]
    channels = int(torch.randint(2, 6, (1,), generator=gen))
    tail = [int(s) for s in torch.randint(2, 4, (spatial,), generator=gen)]
    options = {"momentum": momentum, "affine": affine, "dtype": dtype}
    ref, sync = reference_cls(channels, **options), SyncBatchNorm(channels, **options)
    if affine:
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = torch.randn(channels, generator=gen, dtype=torch.float64).to(dtype)
                getattr(ref, name).copy_(value)
                getattr(sync, name).copy_(value)
    errors = dict.fromkeys(QUANTITIES, 0.0)

    def batch():
        total = world + int(torch.randint(0, 3 * world, (1,), generator=gen))
        sizes = split(total, world, split_kind != "uneven", gen)
        shape = (total, channels, *tail)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        lo = sum(sizes[:rank])
        return x.to(dtype), dy.to(dtype), slice(lo, lo + sizes[rank])

    for _step in range(2):
        x, dy, mine = batch()
        x_ref, x_mine = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        y_ref, y_mine = ref(x_ref), sync(x_mine)
        y_ref.backward(dy)
        y_mine.backward(dy[mine])
        errors["output"] = max(errors["output"], _error(y_mine, y_ref[mine]))
        errors["input_grad"] = max(errors["input_grad"], _error(x_mine.grad, x_ref.grad[mine]))
        if affine:
            grads = torch.cat([sync.weight.grad, sync.bias.grad])
            dist.all_reduce(grads)  # summed over ranks: single-process BN's gradient
            want = torch.cat([ref.weight.grad, ref.bias.grad])
            errors["param_grad"] = max(errors["param_grad"], _error(grads, want))
            for module in (ref, sync):
                module.weight.grad = module.bias.grad = None
    stats = torch.cat([sync.running_mean, sync.running_var]).double()
    want = torch.cat([ref.running_mean, ref.running_var])
    spread = (torch.stack(_gather(stats)) - stats).abs().max().item()  # identical on every rank
    counter = abs(int(sync.num_batches_tracked) - int(ref.num_batches_tracked))
    errors["running_stats"] = max(_error(stats, want), spread, float(counter))
    ref.eval()
    sync.eval()
    x, _dy, mine = batch()
    with torch.no_grad():
        errors["eval_output"] = _error(sync(x[mine]), ref(x)[mine])
    return errors


def _gather(t: Tensor) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return parts


def equality_worker(seed: int = 0) -> dict:
    """Every case on this rank; every rank returns the same summary (max over ranks).

    Returns {"world_size", "cases", "max_error": {dtype: {quantity: error}}, "tolerance",
    "failures": [(case, quantity, error), ...], "passed", "seconds"}.
    """
    start = time.perf_counter()
    all_cases = cases()
    table = torch.zeros(len(all_cases), len(QUANTITIES), dtype=torch.float64)
    for i, case in enumerate(all_cases):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # the same data on every rank
        errors = run_case(*case, gen)
        table[i] = torch.tensor([errors[q] for q in QUANTITIES], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    max_error = {str(d).removeprefix("torch."): dict.fromkeys(QUANTITIES, 0.0) for d in DTYPES}
    failures = []
    for i, (kind, affine, momentum, dtype, split_kind) in enumerate(all_cases):
        name = str(dtype).removeprefix("torch.")
        for j, quantity in enumerate(QUANTITIES):
            err = table[i, j].item()
            max_error[name][quantity] = max(max_error[name][quantity], err)
            if not err <= TOLERANCE[name]:  # NaN fails too
                case = f"{kind} affine={affine} momentum={momentum} {name} {split_kind}"
                failures.append((case, quantity, err))
    return {
        "world_size": dist.get_world_size(),
        "cases": len(all_cases),
        "max_error": max_error,
        "tolerance": dict(TOLERANCE),
        "failures": failures,
        "passed": not failures,
        "seconds": time.perf_counter() - start,
    }


def prove(world_size: int = 2, seed: int = 0, timeout: float = 300.0, quiet: bool = False):
    """Run :func:`equality_worker` in ONE spawned gloo group; print and return its summary."""
    summary = run(world_size, equality_worker, seed, timeout=timeout)[0]
    if not quiet:
        worst = {d: max(q.values()) for d, q in summary["max_error"].items()}
        verdict = "all within tolerance" if summary["passed"] else "FAILURES"
        print(
            f"world size {world_size}: {summary['cases']} cases, {verdict}; largest error "
            + ", ".join(f"{d} {e:.1e}" for d, e in worst.items())
        )
    return summary


# ---------------------------------------------------------------------------------
# Other facts shown inside a group
# ---------------------------------------------------------------------------------

#: what rank 1 gets wrong: its layer's size, its input's dtype or rank, or (a fault of its
#: own, which the others cannot see in the header) its layer's momentum
MISMATCHES = ("num_features", "dtype", "ndim", "momentum")


def mismatch_error(argument: str) -> tuple[str, str, float]:
    """Make rank 1 differ from the others in ``argument``; (error type, message, seconds).

    Every rank should raise, promptly: none is left waiting for the others.
    """
    odd = dist.get_rank() == 1
    features, dtype, shape = 3, torch.float32, (4, 3, 5)
    if argument == "num_features" and odd:
        features, shape = 4, (4, 4, 5)
    elif argument == "dtype" and odd:
        dtype = torch.float64
    elif argument == "ndim" and odd:
        shape = (4, 3, 5, 2)
    elif argument not in MISMATCHES:
        raise ValueError(f"argument must be one of {MISMATCHES} (got {argument!r})")
    layer = SyncBatchNorm(features, dtype=dtype)
    if argument == "momentum" and odd:
        layer.momentum = 1.5  # set after construction, so only forward can notice
    start = time.perf_counter()
    try:
        layer(torch.randn(shape, dtype=dtype))
    except Exception as error:  # what this rank saw
        return type(error).__name__, str(error), time.perf_counter() - start
    return "", "no error", time.perf_counter() - start


def torch_refusal() -> str:
    """What torch.nn.SyncBatchNorm says to a CPU input in training mode in a group ('' if ok)."""
    layer = nn.SyncBatchNorm(3).train()
    try:
        layer(torch.randn(4, 3))
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return ""


def eval_error() -> float:
    """Eval mode without communication: ranks call it 1 and 3 times; max |ours - torch's|."""
    gen = torch.Generator().manual_seed(7)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            getattr(ref, name).copy_(torch.rand(3, generator=gen) + 0.5)
    ours = SyncBatchNorm(3)
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    worst = 0.0
    for _ in range(1 + 2 * dist.get_rank()):  # a collective here would leave a rank waiting
        x = torch.randn(2 + dist.get_rank(), 3, 4, 4, generator=gen)
        with torch.no_grad():
            worst = max(worst, (ours(x) - ref(x)).abs().max().item())
    return worst


def single_value_error() -> str:
    """Rank 0 holds one (N, C) row, the others none: one value per channel over all ranks."""
    layer = SyncBatchNorm(3)
    try:
        layer(torch.randn(1 if dist.get_rank() == 0 else 0, 3))
    except ValueError as error:
        return str(error)
    return ""


def checks_worker() -> dict:
    """The in-group facts of the tests, in one group: mismatches, eval, torch's refusal."""
    return {
        "mismatch": {argument: mismatch_error(argument) for argument in MISMATCHES},
        "single_value": single_value_error(),
        "eval_error": eval_error(),
        "torch_refusal": torch_refusal(),
    }
