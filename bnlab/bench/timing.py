"""Timing, as the course measures it: interleaved runs, medians, profiler shares.

Every speed figure in the course (``make bench``, notebooks 04, 07 and 08) is measured
here. Variants run interleaved (A B C, B C A, ...), so on a shared machine they all see
the same load and their *ratios* stay meaningful even when absolute times drift; tests
never assert a time.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def rotations(names: list[str], repeats: int) -> Iterator[str]:
    """The names in rotating order, ``repeats`` rounds: A B C, B C A, C A B, ..."""
    for r in range(repeats):
        k = r % len(names)
        yield from names[k:] + names[:k]


def time_interleaved(
    fns: dict[str, object], repeats: int = 10, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument function, run in rotating order.

    Interleaving (A B C, B C A, ...) exposes every variant to the same load on a shared
    machine, so their ratios stay meaningful even when absolute times drift.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in rotations(names, repeats):
        start = time.perf_counter()
        fns[n]()
        times[n].append(time.perf_counter() - start)
    return times


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    number: int | None = None,
    threads: int | None = None,
    sync: Callable[[], None] | None = None,
    min_run_time: float = 0.05,
) -> dict[str, torch.utils.benchmark.Measurement]:
    """One ``torch.utils.benchmark`` Measurement per function, the functions interleaved.

    Every round times each function once with ``Timer.timeit(number)`` (``number`` calls
    per timing), in rotating order (A B C, B C A, ...), so all of them share the machine's
    load; the rounds' per-call times become one Measurement per function, whose
    ``median`` and ``iqr`` are the figures ``make bench`` reports. ``number=None`` picks
    it from one warm-up timing so that a timing lasts about ``min_run_time`` seconds.
    ``threads``: the thread count the Timer states and sets (torch.get_num_threads() by
    default); ``sync`` runs after every call inside the timing (torch.cuda.synchronize).
    """
    # torch.utils.benchmark imports torch.utils.cpp_extension, which logs a warning on every
    # machine without the CUDA toolkit ("No CUDA runtime is found"): not ours to print.
    # Imported here, not with this module: notebooks that only use the plain timers skip it.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Measurement, Timer

    threads = threads or torch.get_num_threads()
    names = list(fns)
    timers = {}
    for n in names:
        call = fns[n] if sync is None else (lambda fn=fns[n]: (fn(), sync()))
        timers[n] = Timer("call()", globals={"call": call}, num_threads=threads, label=n)
    numbers = {}
    for n in names:  # warm-up (JIT compilation, first-touch of outputs), then size the timing
        timers[n].timeit(1)
        once = timers[n].timeit(1).raw_times[0]
        numbers[n] = number or max(1, min(1000, int(min_run_time / max(once, 1e-9))))
    raw: dict[str, list[float]] = {n: [] for n in names}
    for n in rotations(names, repeats):
        raw[n].append(timers[n].timeit(numbers[n]).raw_times[0] / numbers[n])  # s per call
    return {
        n: Measurement(
            number_per_run=1, raw_times=raw[n], task_spec=timers[n]._task_spec, metadata=None
        )
        for n in names
    }


def median_times(
    fns: dict[str, Callable[[], object]], repeat: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved (interleaved runs).

    ``sync`` runs inside each timed call (torch.cuda.synchronize on a GPU), so a call's
    time includes the kernels it queued.
    """
    synced = {name: (lambda fn=fn: (fn(), sync())) for name, fn in fns.items()}
    times = time_interleaved(synced, repeats=repeat)
    return {name: statistics.median(t) for name, t in times.items()}


# Kineto, the profiler's C++ backend, logs as `LEVEL:date time pid:tid File.cpp:line] text`
# straight to file descriptor 2, e.g. "gpuGetDeviceCount failed with code 35" on every
# machine without a GPU even when only the CPU is profiled.
_KINETO_LINE = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d \S+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextmanager
def without_kineto_chatter() -> Iterator[None]:
    """Drop Kineto's log lines written to fd 2 inside the block; pass every other line on.

    Python's warning filters cannot see them (C++ writes to the descriptor, not to
    sys.stderr), so fd 2 is pointed at a temporary file for the block and read back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
    kept = [line for line in text.splitlines(keepends=True) if not _KINETO_LINE.match(line)]
    if kept:
        sys.stderr.write("".join(kept))


def operator_shares(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Share of self CPU time per kind of operator in one inference forward pass.

    Kinds: "batch_norm", "conv" (convolution and mkldnn kernels) and "other"; the shares sum
    to 1. One warm-up pass runs first. Measured with torch.profiler (CPU activity only).
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with without_kineto_chatter(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {"batch_norm": 0.0, "conv": 0.0, "other": 0.0}
    for e in events:
        conv = "conv" in e.key or "mkldnn" in e.key
        kind = "batch_norm" if "batch_norm" in e.key else "conv" if conv else "other"
        shares[kind] += e.self_cpu_time_total / total
    return shares


def denormal_times(n: int = 2_000_000, repeats: int = 30) -> dict[str, float]:
    """Median seconds to multiply n float32 values by 0.5: normal, subnormal, subnormal flushed.

    "normal" multiplies values of 1e-3, "subnormal" values of 1e-39 (below float32's
    smallest normal, 1.2e-38), "flushed" the same with ``torch.set_flush_denormal(True)``
    on, which turns them into zeros. Many x86 CPUs take a slow path on subnormals (notebook
    05 measures this machine's).
    """
    from bnlab.experiments.train import flush_denormals

    normal, subnormal, half = (torch.full((n,), v) for v in (1e-3, 1e-39, 0.5))

    def flushed() -> None:
        with flush_denormals(True):
            subnormal * half

    fns = {"normal": lambda: normal * half, "subnormal": lambda: subnormal * half}
    times = time_interleaved({**fns, "flushed": flushed}, repeats=repeats)
    return {name: statistics.median(t) for name, t in times.items()}
