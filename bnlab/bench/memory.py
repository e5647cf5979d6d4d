"""Peak extra memory of each batch_norm implementation, measured by the operating system.

torch.profiler sees only torch's allocations, not Numba's or NumPy's, so the peak is the
process's: each (implementation, shape) runs in a fresh Python process
(``python -m bnlab.bench.memory --child ...``) that

1. imports everything and warms the implementation up on a small shape of the same rank,
   channels and layout (JIT compilation, thread pools: not counted);
2. allocates the inputs and writes every value (x with requires_grad, dy, weight, bias,
   running statistics), so their pages are resident before the baseline;
3. returns freed heap memory to the system (glibc's ``malloc_trim``), resets the peak
   resident set size (Linux: "5" written to /proc/self/clear_refs sets VmHWM to VmRSS) and
   reads the baseline, VmRSS;
4. runs one call (fwd+bwd by default; the gradients are None before it), reads VmHWM and
   reports ``peak_extra_bytes = VmHWM - baseline``: what the call needed on top of its
   inputs, outputs included (y and dx are one tensor each).

By default the child fixes glibc's mmap threshold (``allocator="mmap"``), so that a freed
tensor goes back to the system at once and the peak is what the call held at one time,
the same in every run; ``allocator="glibc"`` keeps glibc's own policy (see
:func:`peak_extra_bytes`).

Where clear_refs is refused (kernels before 4.0, some sandboxes), VmHWM cannot be reset:
the child then reports VmHWM since its start, which is the call's peak because nothing
before it came near (the warm-up shape is small and the inputs are made without
temporaries); ``method`` says which, and ``hwm_slack_bytes`` how far VmHWM was above VmRSS
at the baseline. Linux only (/proc).

The pseudo-implementation ``"probe:K"`` allocates and writes K tensors of the shape, then
frees them: a measurement that is right reports K tensors of peak and none retained.

Serves notebook 04 (``make bench``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from functools import partial

IMPLS = ("torch", "bnlab kernel", "bnlab scratch")
MODES = ("train fwd", "train fwd+bwd", "eval")
LAYOUTS = ("contiguous", "channels_last")
ALLOCATORS = ("mmap", "glibc")
MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, fixed (see peak_extra_bytes)
SHAPES = [(32, 64, 56, 56), (1024, 512)]
# The warm-up shape has about this many values: enough to start torch's and Numba's thread
# pools (torch splits work above 32768 values), small beside the measured shapes.
WARMUP_VALUES = 2**18
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (from /proc/self/status)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


def _reset_peak() -> bool:
    """Reset VmHWM to VmRSS (write "5" to /proc/self/clear_refs); whether it took effect.

    It did when VmHWM went down; when VmHWM was already within 64 pages of VmRSS there is
    nothing to tell apart, and nothing to reset either.
    """
    before = _status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status()["VmHWM"] < before["VmHWM"] or before["VmHWM"] - before["VmRSS"] < 64 * PAGE


def _trim_heap() -> None:
    """Give freed heap memory back to the system, so that reusing it would count again."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _implementation(impl: str) -> Callable:
    """name -> f(x, rm, rv, w, b, training, momentum, eps): make bench's own functions."""
    from bnlab.bench.cpu import implementations

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or 'probe:K' (got {impl!r})")
    return implementations(large=False)[impl]["bn"]


def _inputs(shape: tuple[int, ...], layout: str) -> dict:
    """Inputs with every value written, made in place (no temporary to inflate VmHWM)."""
    import torch

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.empty(shape, memory_format=fmt).normal_(generator=g)
    return {
        "x": x.requires_grad_(),
        "dy": torch.empty(shape, memory_format=fmt).normal_(generator=g),
        "weight": torch.empty(c).uniform_(0.5, 1.5, generator=g).requires_grad_(),
        "bias": torch.empty(c).normal_(generator=g).requires_grad_(),
        "running_mean": torch.zeros(c),
        "running_var": torch.ones(c),
    }


def _call(bn: Callable, mode: str, t: dict) -> list:
    """One call of ``bn`` in ``mode`` on the inputs ``t``: the tensors it produced."""
    import torch

    args = (t["running_mean"], t["running_var"], t["weight"], t["bias"])
    if mode == "train fwd+bwd":
        t["x"].grad = t["weight"].grad = t["bias"].grad = None
        y = bn(t["x"], *args, True, 0.1, 1e-5)
        y.backward(t["dy"])
        return [y, t["x"].grad, t["weight"].grad, t["bias"].grad]
    with torch.no_grad():
        return [bn(t["x"], *args, mode == "train fwd", 0.1, 1e-5)]


def _probe(k: int) -> Callable[[str, dict], list]:
    """A pseudo-implementation: K tensors of the input's shape allocated, written, freed."""
    import torch

    def run(mode, t):
        held = [torch.empty(t["x"].shape).fill_(1.0) for _ in range(k)]
        del held
        return []

    return run


def measure_child(impl: str, shape: tuple[int, ...], mode: str, layout: str, threads: int) -> dict:
    """In a fresh process: warm up, allocate, reset the peak, run once; the figures (bytes)."""
    import numba
    import torch

    import bnlab.kernels.autograd  # noqa: F401 (imports are not the call's memory)
    import bnlab.nn.functional  # noqa: F401

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if impl.startswith("probe:"):
        step = _probe(int(impl.split(":")[1]))
    else:
        step = partial(_call, _implementation(impl))
    rest = math.prod(shape[1:])
    small = (max(2, min(shape[0], math.ceil(WARMUP_VALUES / rest))), *shape[1:])
    for _ in range(2):
        step(mode, _inputs(small, layout))
    t = _inputs(shape, layout)
    _trim_heap()
    reset = _reset_peak()
    before = _status()
    outputs = step(mode, t)
    after = _status()
    tensor_bytes = math.prod(shape) * 4
    peak_extra = after["VmHWM"] - before["VmRSS"]
    output_bytes = sum(o.numel() * o.element_size() for o in outputs if o is not None)
    return {
        "impl": impl,
        "shape": list(shape),
        "mode": mode,
        "layout": layout,
        "threads": threads,
        "allocator": "mmap" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc",
        "method": "VmHWM reset by clear_refs" if reset else "VmHWM since process start",
        "hwm_slack_bytes": before["VmHWM"] - before["VmRSS"],
        "tensor_bytes": tensor_bytes,
        "baseline_bytes": before["VmRSS"],
        "peak_extra_bytes": peak_extra,
        "peak_extra_tensors": peak_extra / tensor_bytes,
        "retained_bytes": after["VmRSS"] - before["VmRSS"],
        "output_bytes": output_bytes,
        "output_tensors": output_bytes / tensor_bytes,
    }


def peak_extra_bytes(
    impl: str,
    shape: Iterable[int],
    mode: str = "train fwd+bwd",
    layout: str = "contiguous",
    threads: int = 2,
    allocator: str = "mmap",
    timeout: float = 600,
) -> dict:
    """Peak memory one call of ``impl`` needs beyond its inputs, measured in a fresh process.

    impl: "torch", "bnlab kernel" (CPU backend), "bnlab scratch", or "probe:K"; shape
    (N, C, *) float32; mode "train fwd+bwd", "train fwd" or "eval"; layout "contiguous" or
    "channels_last" (4-D). Returns the child's dict: peak_extra_bytes (VmHWM during the
    call minus VmRSS before it), peak_extra_tensors (the same in units of one tensor of
    ``shape``, tensor_bytes), output_bytes / output_tensors (what the call returned: y,
    and for fwd+bwd dx, dgamma, dbeta), retained_bytes (VmRSS after the call minus before:
    the outputs, and freed memory the allocator kept), baseline_bytes, method and
    hwm_slack_bytes (see the module's docstring), allocator.

    allocator: "mmap" (the default) fixes glibc's mmap threshold at 128 KiB in the child
    (``MALLOC_MMAP_THRESHOLD_``), so every block of a tensor's size is mapped when
    allocated and unmapped when freed: the peak is what the call had allocated at once,
    the same from run to run. "glibc" keeps glibc's default, whose threshold rises after
    the first large free, after which freed blocks stay in the heap for reuse: closer to a
    long-running process, but with fragmentation that varies between runs (bnlab scratch
    at (32, 64, 56, 56): 5 tensors with "mmap", 7 to 10 with "glibc").
    """
    shape = tuple(int(d) for d in shape)
    if impl not in IMPLS and not re.fullmatch(r"probe:\d+", impl):
        raise ValueError(f"impl must be one of {IMPLS} or 'probe:K' (got {impl!r})")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if layout not in LAYOUTS or (layout == "channels_last" and len(shape) != 4):
        raise ValueError(f"layout must be one of {LAYOUTS}, channels_last for 4-D (got {layout!r})")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS} (got {allocator!r})")
    cmd = [sys.executable, "-m", "bnlab.bench.memory", "--child", "--impl", impl]
    cmd += ["--shape", "x".join(map(str, shape)), "--mode", mode, "--layout", layout]
    cmd += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["NUMBA_NUM_THREADS"] = str(max(threads, int(env.get("NUMBA_NUM_THREADS", 0) or 0)))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if allocator == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the memory child for {impl} at {shape} failed (exit {proc.returncode}):\n"
            + proc.stderr[-3000:]
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(
    shapes: Iterable[Iterable[int]] = SHAPES,
    impls: Iterable[str] = IMPLS,
    mode: str = "train fwd+bwd",
    layout: str = "contiguous",
    threads: int = 2,
    allocator: str = "mmap",
) -> list[dict]:
    """One :func:`peak_extra_bytes` row per (shape, implementation), a fresh process each."""
    return [
        peak_extra_bytes(impl, shape, mode, layout, threads, allocator)
        for shape in shapes
        for impl in impls
    ]


def format_memory_table(rows: list[dict]) -> str:
    """A text table: peak extra MB and in tensors of the shape, outputs, retained MB."""
    head = (
        f"{'shape':<18} {'implementation':<14} {'mode':<13} {'peak MB':>8} {'tensors':>7} "
        f"{'outputs':>7} {'retained MB':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{str(tuple(r['shape'])):<18} {r['impl']:<14} {r['mode']:<13} "
            f"{r['peak_extra_bytes'] / 1e6:>8.1f} {r['peak_extra_tensors']:>7.2f} "
            f"{r['output_tensors']:>7.2f} {r['retained_bytes'] / 1e6:>11.1f}"
        )
    return "\n".join(lines)


def record_memory(rows: list[dict]) -> None:
    """Put the peaks in the results store (table "bench"), one figure per shape, all
    implementations side by side in units of one tensor of the shape."""
    from bnlab.teaching.results import record

    shapes = {}
    for r in rows:
        shapes.setdefault(tuple(r["shape"]), []).append(r)
    for shape, found in shapes.items():
        key = "x".join(map(str, shape))
        record(
            f"bench.memory.{key}",
            {r["impl"]: r["peak_extra_bytes"] for r in found},
            f"peak memory beyond the inputs, one {found[0]['mode']}, {shape}, fresh process each",
            "; ".join(
                f"{r['impl']} {r['peak_extra_bytes'] / 1e6:.2f} MB = {r['peak_extra_tensors']:.2f} "
                "tensors"
                for r in found
            ),
            table="bench",
        )


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.replace(",", "x").split("x"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.bench.memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=_shape, default=SHAPES[0], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", type=_shape, nargs="+", default=SHAPES, help="e.g. 32x64x56x56")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), help="implementations")
    parser.add_argument("--mode", choices=MODES, default="train fwd+bwd")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and numba)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="mmap", help="see the docs")
    args = parser.parse_args(argv)
    if args.child:
        result = measure_child(args.impl, args.shape, args.mode, args.layout, args.threads)
        print(json.dumps(result))
        return
    rows = memory_table(
        args.shapes, args.impls, args.mode, args.layout, args.threads, args.allocator
    )
    print(
        f"peak memory beyond the inputs, {args.mode}, float32, {args.layout}, "
        f"{args.threads} threads, allocator: {args.allocator}"
    )
    print("tensors: in units of one tensor of the shape; outputs: what the call returned\n")
    print(format_memory_table(rows))


if __name__ == "__main__":
    main()
