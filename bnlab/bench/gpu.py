"""``python -m bnlab.bench.gpu`` (``make bench-gpu``): the CUDA kernels against torch on a GPU.

For each benchmark shape (float32; the last one also in channels_last memory format):

1. **check**: bnlab's CUDA kernels (:func:`bnlab.kernels.autograd.batch_norm` with
   ``backend="cuda"``) against ``torch.nn.functional.batch_norm`` in training mode, on the
   same inputs: the output, dx, dgamma, dbeta, the updated running statistics, and the
   eval-mode output with those statistics (:func:`check_against_torch`);
2. **timing** on the GPU's own clock: every call between two CUDA events, after a flush of the L2
   cache (a write of a buffer twice the L2's size, outside the events), so that no call
   finds its input in cache from the previous one; torch (cuDNN or its native kernel) and
   the bnlab kernel interleaved, in alternating order (:func:`time_interleaved`), in three
   modes: "train fwd", "train fwd+bwd" and "eval" (running statistics, no grad)
   (:func:`measure_shape`), as one case dict per (mode, implementation)
   (:func:`build_cases`). The goal shape is timed first; shapes past the time budget
   (``--budget-s``, 240 s by default) are listed as skipped, so the script stays under 5 minutes;
3. **goals** at (64, 256, 56, 56), contiguous: forward+backward at >= 0.9x torch's speed and
   at >= 75% of the device's peak memory bandwidth (:func:`compute_goals`).

Bandwidth counts the minimum full-tensor passes of each mode: train fwd 3 (read x for the
statistics, read x, write y), train fwd+bwd 8 (those 3, then read dy and x for the two
reductions, read dy and x and write dx), eval 2 (read x, write y): at the goal shape x is
205 MB, about four times an H100's 50 MB L2, so no pass can be served from cache. The peak is
2 x memory clock x bus width from the device's attributes, or the vendor's figure for a
known device name (:data:`HBM_PEAK_GBPS`) where the attributes cannot be read
(:func:`peak_bandwidth`).

The figures go to ``build/bench-gpu.json`` (``--json PATH``; ``make bench-gpu
BENCH_JSON=path``): {"schema": 1, "kind": "bench-gpu", "measured": true, versions, device,
"peak_GBps", "torch_backend", "goals", "cases", "checks", "skipped", "seconds"}, the
cases in the CPU bench's schema. A shape whose check fails is reported on stderr, by
shape, and not timed; the script then exits with status 1 after writing the other shapes'
figures. Without a CUDA GPU it prints one line saying so and exits 0: nothing is measured
and no JSON is written (a JSON left by an earlier GPU run stays as it was). The logic runs
on Numba's CUDA simulator in the tests (tiny shapes, CPU tensors, a host clock, a given
peak bandwidth).

Serves notebook 04 (``make bench-gpu``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as TF

from bnlab.bench.cases import PASSES, cases_from, format_goals  # noqa: F401 (PASSES re-exported)

SHAPES: list[tuple[tuple[int, ...], str]] = [  # the goal shape first: timed within budget
    ((64, 256, 56, 56), "contiguous"),
    ((64, 256, 56, 56), "channels_last"),
    ((32, 64, 56, 56), "contiguous"),
    ((256, 64, 28, 28), "contiguous"),
    ((1024, 512), "contiguous"),
]
LAYOUTS = ("contiguous", "channels_last")
IMPLS = ("torch", "bnlab kernel")
MODES = ("train fwd", "train fwd+bwd", "eval")
# 5 shapes x 3 modes x 2 implementations x (REPEATS + WARMUP) calls of at most a few ms
# each, plus an L2 flush before each: seconds of timing on an H100; the checks and Numba's
# compilations (explicit signatures: compiled once, at the first call) take longer.
REPEATS = 30
WARMUP = 3
BUDGET_S = 240.0
GOAL_SHAPE = (64, 256, 56, 56)
GOAL_SPEEDUP = 0.9
GOAL_BANDWIDTH = 0.75
DEFAULT_JSON = Path("build") / "bench-gpu.json"
MOMENTUM, EPS = 0.1, 1e-5

# Tolerance of the check, |bnlab - torch| <= ATOL * scale + RTOL * |torch|, per value.
# float32's unit roundoff is 6e-8. Two correct implementations differ only by the rounding
# of the per-channel reductions (Welford/Chan or tree sums over m = N*HW values, in
# different orders): relative errors of a few u*log2(m), about 1e-6 at m = 2e5, two orders
# below 1e-4; a wrong formula, channel or index is off by far more (at the tiny test shapes
# even the biased-for-unbiased variance, a relative 1/m, is). y, dx and the running
# statistics are of order 1 for these inputs (scale 1); dgamma = sum(dy * x_hat) and
# dbeta = sum(dy) add m terms of order 1, so they are of order sqrt(m) (scale sqrt(m)).
RTOL = 1e-4
ATOL = 1e-4
NO_GPU = "bench-gpu: no CUDA GPU found (torch.cuda.is_available() is False); nothing was measured."


def parse_shape(text: str) -> tuple[tuple[int, ...], str]:
    """A --shapes value: "64x256x56x56" -> ((64, 256, 56, 56), "contiguous"); a
    ":channels_last" suffix sets the layout."""
    dims, _, layout = text.partition(":")
    layout = layout or "contiguous"
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"layout must be one of {LAYOUTS} (got {layout!r})")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is like 64x256x56x56 (got {text!r})") from None
    if len(shape) < 2 or (layout == "channels_last" and len(shape) != 4):
        raise argparse.ArgumentTypeError(f"need (N, C, ...), channels_last 4-D (got {text!r})")
    return shape, layout


def make_inputs(
    shape: Iterable[int], layout: str = "contiguous", device: str = "cuda", seed: int = 0
) -> dict[str, torch.Tensor]:
    """float32 inputs on ``device``: x and dy of ``shape`` in ``layout``; weight, bias,
    running_mean, running_var of shape (C,).

    x has a different mean and spread per channel, so that a channel mix-up shows; the
    running statistics start away from (0, 1), so that the eval check uses them.
    """
    shape = tuple(shape)
    c = shape[1]
    g = torch.Generator(device=device).manual_seed(seed)
    per_channel = (1, c) + (1,) * (len(shape) - 2)

    def randn(*size):
        return torch.randn(size, generator=g, device=device)

    def rand(*size):
        return torch.rand(size, generator=g, device=device)

    x = randn(*shape) * (0.5 + rand(c)).view(per_channel) + (2 * randn(c)).view(per_channel)
    dy = randn(*shape)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return {
        "x": x,
        "dy": dy,
        "weight": 0.5 + rand(c),
        "bias": randn(c),
        "running_mean": 0.1 * randn(c),
        "running_var": 0.5 + rand(c),
    }


def implementations(backend: str = "cuda") -> dict[str, Callable]:
    """The compared functions, torch's first: name -> f(x, rm, rv, w, b, training, momentum, eps).

    The kernel is looked up in :mod:`bnlab.kernels.autograd` at every call (numba.cuda is
    imported on the first one), so a test can replace it.
    """
    from bnlab.kernels import autograd

    def kernel(*args):
        return autograd.batch_norm(*args, backend=backend)

    return {"torch": TF.batch_norm, "bnlab kernel": kernel}


def _train_step(bn: Callable, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One training fwd+bwd and an eval fwd on copies of ``inputs``: every compared value."""
    x, w, b = (inputs[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias"))
    rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
    y = bn(x, rm, rv, w, b, True, MOMENTUM, EPS)
    y.backward(inputs["dy"])
    with torch.no_grad():
        y_eval = bn(inputs["x"], rm, rv, inputs["weight"], inputs["bias"], False, MOMENTUM, EPS)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dgamma": w.grad,
        "dbeta": b.grad,
        "running_mean": rm,
        "running_var": rv,
        "eval y": y_eval,
    }


def check_against_torch(
    shape: Iterable[int],
    layout: str = "contiguous",
    device: str = "cuda",
    backend: str = "cuda",
    seed: int = 0,
) -> dict:
    """Compare the bnlab kernel with torch on one shape; a report dict, never an exception.

    Report: "shape", "layout", "passed" (bool), "error" (the kernel's exception as text, or
    None), "diffs": per value {"max_abs_diff", "ratio"}, where ratio is the largest
    |bnlab - torch| / (ATOL * scale + RTOL * |torch|) (<= 1 passes; NaN fails), and "worst"
    (the value with the largest ratio). :func:`failure_message` words a failed one.
    """
    shape = tuple(shape)
    report = {"shape": list(shape), "layout": layout, "passed": False, "error": None}
    report.update(diffs={}, worst=None)
    inputs = make_inputs(shape, layout, device, seed)
    impls = implementations(backend)
    want = _train_step(impls["torch"], inputs)
    try:
        got = _train_step(impls["bnlab kernel"], inputs)
    except Exception as err:  # a refusal is a failed check, reported with the shape
        report["error"] = f"{type(err).__name__}: {err}"
        return report
    sqrt_m = math.sqrt(math.prod(shape) // shape[1])
    for name, ref in want.items():
        scale = sqrt_m if name in ("dgamma", "dbeta") else 1.0
        ref = ref.detach().double().cpu()
        value = got[name]
        if value is None or tuple(value.shape) != tuple(ref.shape):
            shown = None if value is None else tuple(value.shape)
            report["diffs"][name] = {"max_abs_diff": math.inf, "ratio": math.inf, "got": shown}
            continue
        err = (value.detach().double().cpu() - ref).abs()
        ratio = (err / (ATOL * scale + RTOL * ref.abs())).max().item()
        report["diffs"][name] = {"max_abs_diff": err.max().item(), "ratio": ratio}
    ratios = {k: d["ratio"] for k, d in report["diffs"].items()}
    report["worst"] = max(ratios, key=lambda k: math.inf if math.isnan(ratios[k]) else ratios[k])
    report["passed"] = all(r <= 1 for r in ratios.values())  # NaN <= 1 is False
    return report


def failure_message(report: dict) -> str:
    """One line naming the shape and layout, and what disagreed (or what was raised)."""
    where = f"{tuple(report['shape'])} {report['layout']}"
    if report["error"]:
        return f"bench-gpu: the CUDA kernel failed at shape {where}: {report['error']}"
    bad = [
        f"{name} max |diff| {d['max_abs_diff']:.3g} = {d['ratio']:.3g}x tolerance"
        for name, d in report["diffs"].items()
        if not d["ratio"] <= 1
    ]
    return f"bench-gpu: the CUDA kernel disagrees with torch at shape {where}: " + "; ".join(bad)


def format_check(report: dict) -> str:
    """One line per check: "ok", the shape and the worst value's share of its tolerance, or
    :func:`failure_message`."""
    if not report["passed"]:
        return failure_message(report)
    worst = report["diffs"][report["worst"]]
    return (
        f"ok   {str(tuple(report['shape'])):<18} {report['layout']:<13} worst: "
        f"{report['worst']} at {worst['ratio']:.2g} of its tolerance "
        f"(max |diff| {worst['max_abs_diff']:.2g})"
    )


def _step(mode: str, bn: Callable, inputs: dict[str, torch.Tensor], x_grad: torch.Tensor):
    """A zero-argument call of ``bn`` in ``mode``, on its own running buffers and leaves."""
    rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
    w, b = (inputs[k].detach().clone().requires_grad_() for k in ("weight", "bias"))
    x, dy = inputs["x"], inputs["dy"]

    def train_fwd():
        with torch.no_grad():
            return bn(x, rm, rv, w, b, True, MOMENTUM, EPS)

    def train_fwd_bwd():
        x_grad.grad = w.grad = b.grad = None  # as zero_grad(): no accumulation timed
        bn(x_grad, rm, rv, w, b, True, MOMENTUM, EPS).backward(dy)

    def evaluate():
        with torch.no_grad():
            return bn(x, rm, rv, w, b, False, MOMENTUM, EPS)

    return {"train fwd": train_fwd, "train fwd+bwd": train_fwd_bwd, "eval": evaluate}[mode]


class EventClock:
    """Time on the GPU's clock: CUDA events around each call, after an L2 flush outside them.

    The flush writes a buffer of ``flush_bytes`` (twice the L2 by default), so each timed
    call reads its inputs from HBM, as it would after the layers that ran before it.
    """

    def __init__(self, flush_bytes: int | None = None, device: str = "cuda") -> None:
        if flush_bytes is None:
            flush_bytes = 2 * l2_bytes()
        self.buffer = torch.empty(max(1, flush_bytes // 4), dtype=torch.float32, device=device)

    def flush(self) -> None:
        self.buffer.zero_()

    def start(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return started, event

    def seconds(self, token) -> float:
        started, stopped = token
        stopped.synchronize()
        return started.elapsed_time(stopped) / 1e3  # elapsed_time is in ms


class HostClock:
    """Host time (``time.perf_counter``), for the simulator and the tests: no flush."""

    def flush(self) -> None:
        pass

    def start(self):
        return time.perf_counter()

    def stop(self, started):
        return time.perf_counter() - started

    def seconds(self, token) -> float:
        return token


def summarize(times: list[float]) -> SimpleNamespace:
    """median, iqr (upper minus lower quartile) and the times, in seconds."""
    times = list(times)
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return SimpleNamespace(median=statistics.median(times), iqr=q3 - q1, times=times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, clock, warmup: int = WARMUP
) -> dict[str, SimpleNamespace]:
    """Time each function ``warmup + repeats`` times, interleaved (A B, B A, A B, ...), one
    call per timing after ``clock.flush()``; the warm-up calls are dropped. One summary
    (:func:`summarize`) per function. Events are read only at the end: no host sync
    between calls beyond what the functions do themselves."""
    names = list(fns)
    tokens: dict[str, list] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            clock.flush()
            started = clock.start()
            fns[name]()
            token = clock.stop(started)
            if r >= warmup:
                tokens[name].append(token)
    return {n: summarize([clock.seconds(t) for t in tokens[n]]) for n in names}


def measure_shape(
    shape: Iterable[int],
    layout: str = "contiguous",
    *,
    peak_GBps: float,
    device_name: str,
    device: str = "cuda",
    backend: str = "cuda",
    repeats: int = REPEATS,
    clock=None,
) -> list[dict]:
    """Time torch and the bnlab kernel in every mode on one shape: the case dicts.

    ``clock``: :class:`EventClock` on a GPU (the default there), :class:`HostClock` otherwise.
    """
    shape = tuple(shape)
    if clock is None:
        clock = EventClock(device=device) if device == "cuda" else HostClock()
    inputs = make_inputs(shape, layout, device)
    x_grad = inputs["x"].detach().clone().requires_grad_()
    impls = implementations(backend)
    measurements = {}
    for mode in MODES:
        fns = {name: _step(mode, bn, inputs, x_grad) for name, bn in impls.items()}
        measurements[mode] = time_interleaved(fns, repeats, clock)
    return build_cases(shape, layout, measurements, repeats, peak_GBps, device_name)


def build_cases(
    shape: Iterable[int],
    layout: str,
    measurements: dict[str, dict],
    repeats: int,
    peak_GBps: float,
    device_name: str,
) -> list[dict]:
    """Case dicts (:func:`bnlab.bench.cases.cases_from`, the schema ``make bench`` writes)
    from ``measurements[mode][impl]``, with ``device_name`` and bandwidth against the
    device's peak."""
    cases = cases_from(measurements, shape, layout, "cuda", peak_GBps, device_name=device_name)
    for case in cases:
        case["repeats"] = repeats
    return cases


def compute_goals(cases: list[dict], shape: Iterable[int] = GOAL_SHAPE) -> list[dict]:
    """The course's two GPU goals, from the bnlab kernel's contiguous "train fwd+bwd" case at
    ``shape``: [{"what", "value", "met"}, ...]; value None (not met) when that case is absent."""
    shape = [int(d) for d in shape]
    case = next(
        (
            c
            for c in cases
            if c["shape"] == shape
            and c["layout"] == "contiguous"
            and c["impl"] == "bnlab kernel"
            and c["mode"] == "train fwd+bwd"
        ),
        None,
    )
    where = str(tuple(shape))
    speedup = None if case is None else case["speedup_vs_torch"]
    fraction = None if case is None else case["bandwidth_fraction"]
    return [
        {
            "what": f"fwd+bwd >= {GOAL_SPEEDUP}x torch at {where}",
            "value": speedup,
            "met": speedup is not None and speedup >= GOAL_SPEEDUP,
        },
        {
            "what": f">= {GOAL_BANDWIDTH:.0%} of peak bandwidth at {where} fwd+bwd",
            "value": fraction,
            "met": fraction is not None and fraction >= GOAL_BANDWIDTH,
        },
    ]


def report(
    cases: list[dict],
    goals: list[dict],
    checks: list[dict],
    *,
    device_name: str,
    peak_GBps: float,
    torch_backend: str,
) -> dict:
    """The JSON document: schema 1, kind "bench-gpu", versions, device, goals, cases, checks."""
    try:
        numba_cuda = importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        numba_cuda = None
    return {
        "schema": 1,
        "kind": "bench-gpu",
        "measured": True,
        "torch": torch.__version__,
        "numba_cuda": numba_cuda,
        "device_name": device_name,
        "peak_GBps": peak_GBps,
        "torch_backend": torch_backend,
        "goals": goals,
        "cases": cases,
        "checks": [_strict_json(c) for c in checks],
    }


def _strict_json(value):
    """``value`` with every non-finite float as a string ("inf", "nan"): strict JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(doc: dict, path: str | Path) -> Path:
    """Write ``doc`` to ``path`` (its folder created), indented; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def format_cases(cases: list[dict]) -> str:
    """A text table: one row per case, times in ms, x torch, GB/s and % of peak."""
    head = (
        f"{'shape':<18} {'layout':<13} {'mode':<13} {'impl':<12} {'median ms':>9} "
        f"{'iqr ms':>7} {'x torch':>7} {'GB/s':>7} {'% peak':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cases:
        lines.append(
            f"{str(tuple(c['shape'])):<18} {c['layout']:<13} {c['mode']:<13} {c['impl']:<12} "
            f"{c['median_s'] * 1e3:>9.3f} {c['iqr_s'] * 1e3:>7.3f} "
            f"{c['speedup_vs_torch']:>7.2f} {c['bandwidth_GBps']:>7.0f} "
            f"{100 * c['bandwidth_fraction']:>5.0f}%"
        )
    return "\n".join(lines)


# Vendor HBM/GDDR peaks in GB/s, by a part of torch.cuda.get_device_name(): the fallback
# where the device attributes cannot be read (CUDA 13 dropped memoryClockRate from
# cudaDeviceProp). First match wins: the more specific names come first.
HBM_PEAK_GBPS: list[tuple[str, float]] = [
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80 GB, "NVIDIA H100 80GB HBM3"
    ("H200", 4800.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB, SXM4 and PCIe
    ("L40S", 864.0),
    ("L4", 300.0),
    ("V100", 900.0),
]


def peak_from_attributes(clock_khz: float, bus_bits: float) -> float:
    """2 (double data rate) x memory clock x bus width, in GB/s."""
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def peak_from_name(name: str) -> float | None:
    """The vendor's peak for a device name from :data:`HBM_PEAK_GBPS`, or None."""
    return next((gbps for part, gbps in HBM_PEAK_GBPS if part in name), None)


def peak_bandwidth(name: str, clock_khz: float | None, bus_bits: float | None) -> tuple[float, str]:
    """(GB/s, source): from the attributes when both are known and nonzero, else the name
    table; ValueError when neither is available (no goal can be judged then)."""
    if clock_khz and bus_bits:
        return peak_from_attributes(clock_khz, bus_bits), "device attributes"
    by_name = peak_from_name(name)
    if by_name is None:
        raise ValueError(
            f"no peak memory bandwidth for {name!r}: the device attributes are unreadable "
            "and the name is not in bnlab.bench.gpu.HBM_PEAK_GBPS; add it there"
        )
    return by_name, "name table"


def _memory_attributes() -> tuple[float | None, float | None]:
    """The memory clock (kHz) and bus width (bits) through Numba, else torch, else None."""
    try:
        from bnlab.kernels.backend import cuda_module

        dev = cuda_module().get_current_device()
        return dev.MEMORY_CLOCK_RATE, dev.GLOBAL_MEMORY_BUS_WIDTH
    except Exception:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)


def gpu_peak_bandwidth() -> float:
    """This GPU's peak memory bandwidth in GB/s (:func:`peak_bandwidth`)."""
    return peak_bandwidth(torch.cuda.get_device_name(), *_memory_attributes())[0]


def l2_bytes() -> int:
    """The GPU's L2 size from torch's device properties (50 MB, an H100's, if unreadable)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def torch_gpu_backend(shape: Iterable[int] = GOAL_SHAPE) -> str:
    """Which kernel torch's batch_norm dispatches to on this GPU: cuDNN, MIOpen or native."""
    shape = tuple(shape)
    x = torch.empty(shape, device="cuda")
    v = torch.ones(shape[1], device="cuda")
    return str(torch._C._select_batch_norm_backend(x, v, v, v, v, True, 1e-5)).split(".")[-1]


def _device_facts() -> tuple[str, float, str]:
    """The GPU's name, its peak bandwidth in GB/s, and torch's batch_norm backend."""
    try:
        backend = torch_gpu_backend(GOAL_SHAPE)
    except Exception as err:  # a private torch function: name what happened, do not stop
        backend = f"unknown ({type(err).__name__})"
    return torch.cuda.get_device_name(), gpu_peak_bandwidth(), backend


def main(argv: list[str] | None = None) -> int:
    """Check, time and report; returns the exit status (0, or 1 when a check failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m bnlab.bench.gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=SHAPES,
        help="shapes such as 64x256x56x56 or 64x256x56x56:channels_last",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timings per function")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="no new shape is timed after this"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    from bnlab.kernels.backend import cuda_module, is_simulator

    if is_simulator(cuda_module()):
        print(
            "bench-gpu: NUMBA_ENABLE_CUDASIM=1 is set, so the kernels would run on the "
            "simulator; unset it to measure the GPU",
            file=sys.stderr,
        )
        return 2
    device_name, peak, backend = _device_facts()
    return run(
        args.shapes,
        args.json,
        repeats=args.repeats,
        device_name=device_name,
        peak_GBps=peak,
        torch_backend=backend,
        budget_s=args.budget_s,
    )


def run(
    shapes: list[tuple[tuple[int, ...], str]],
    json_path: str | Path,
    *,
    repeats: int = REPEATS,
    device_name: str,
    peak_GBps: float,
    torch_backend: str,
    device: str = "cuda",
    backend: str = "cuda",
    clock=None,
    goal_shape: Iterable[int] = GOAL_SHAPE,
    budget_s: float = BUDGET_S,
) -> int:
    """Check every (shape, layout), time those that passed, print, write the JSON.

    Returns the exit status: 0, or 1 when a check failed (each failure on stderr, naming
    its shape). A shape not yet started when ``budget_s`` seconds have passed is not
    timed, and listed in the JSON's "skipped". :func:`main` calls it on the GPU; the tests
    on the simulator, with CPU tensors (``device="cpu"``), a :class:`HostClock` and a given
    peak bandwidth.
    """
    began = time.perf_counter()
    print(f"{device_name}: peak {peak_GBps:.0f} GB/s; torch {torch.__version__}, "
          f"batch_norm: {torch_backend}")  # fmt: skip
    print(f"check against torch (tolerance {ATOL:g} x scale + {RTOL:g} x |torch|):")
    checks = []
    for shape, layout in shapes:
        checks.append(check_against_torch(shape, layout, device, backend))
        print(format_check(checks[-1]), flush=True)
    cases, skipped = [], []
    for check, (shape, layout) in zip(checks, shapes, strict=True):
        if check["passed"] and time.perf_counter() - began > budget_s:
            skipped.append({"shape": list(shape), "layout": layout})
        elif check["passed"]:
            cases += measure_shape(
                shape,
                layout,
                peak_GBps=peak_GBps,
                device_name=device_name,
                device=device,
                backend=backend,
                repeats=repeats,
                clock=clock,
            )
    goals = compute_goals(cases, goal_shape)
    print(f"\nfloat32, x torch: torch's median / this median; {repeats} timings each\n")
    print(format_cases(cases))
    print("\n" + format_goals(goals))
    doc = report(
        cases,
        goals,
        checks,
        device_name=device_name,
        peak_GBps=peak_GBps,
        torch_backend=torch_backend,
    )
    doc["skipped"] = skipped
    doc["seconds"] = time.perf_counter() - began
    for item in skipped:
        print(
            f"not timed (past the {budget_s:.0f} s budget): {tuple(item['shape'])} {item['layout']}"
        )
    print(f"\nwrote {write_json(doc, json_path)}")
    failed = [failure_message(c) for c in checks if not c["passed"]]
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
