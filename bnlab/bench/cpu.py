"""BatchNorm on the CPU, bnlab's kernels vs torch and torch.compile: the cases of ``make bench``.

Each case is one (shape, memory layout, implementation, mode) measured with
``torch.utils.benchmark`` (:func:`bnlab.bench.timing.measure_interleaved`: the
implementations interleaved, median and interquartile range of the repeats). The
implementations: torch's eager ``batch_norm`` (eval + ReLU: ``batch_norm`` then
``relu_``), bnlab's kernel, and ``torch.compile(F.batch_norm)`` (inductor; training
forward + backward and eval + ReLU), compiled once before the timed loop, its compile
time reported apart.

Each case is judged against its floor (:mod:`bnlab.bench.cases`): its minimum traffic,
read and write apart, at bandwidths measured here on buffers the size of the tensor:

- read-only bandwidth: ``sum`` of a buffer (bytes read / time);
- write-only bandwidth: ``fill_`` of a buffer already written once (pages faulted in):
  bytes written / time; an ordinary store reads each line before writing it
  (write-allocate), and the figure includes that cost, as a kernel's stores do;
- copy bandwidth: ``copy_``, counted as 3 bytes moved per byte copied (read the source;
  read the destination's lines for ownership, then write them), for comparison.

On the shape at least 4x the last-level cache the floor is DRAM's; on the smaller shapes
it is the cache's bandwidth at that size.

Serves notebook 04 (``make bench``).
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as TF

from bnlab.bench.cases import PASSES, cases_from, floor_seconds, format_goals  # noqa: F401
from bnlab.bench.timing import measure_interleaved
from bnlab.nn import functional as F

RATIO_SHAPES = [(32, 64, 56, 56), (256, 64, 28, 28), (1024, 512)]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train fwd", "train fwd+bwd", "eval", "eval+relu")
COMPILED_MODES = ("train fwd+bwd", "eval+relu")  # torch.compile's cases
LARGE_MODES = ("train fwd", "train fwd+bwd", "eval+relu")  # the floor's phases, large shape
CACHE_FACTOR = 4  # the DRAM floor needs a tensor this many times the last-level cache
COMPILE = "torch.compile"


def _sysfs_caches() -> dict[int, int]:
    """level -> bytes of cpu0's data or unified caches, from Linux's sysfs ({} elsewhere)."""
    sizes: dict[int, int] = {}
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        path = Path(index)
        try:
            level = int((path / "level").read_text())
            kind = (path / "type").read_text().strip()
            size = (path / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            sizes[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return sizes


def cache_sizes() -> dict[str, int | str | None]:
    """{"l2_bytes", "llc_bytes", "source"}: the kernels' own reading
    (``bnlab.kernels.cpu.cache_sizes``, which sizes their channel groups) when it exists,
    else sysfs; None where unknown."""
    from bnlab.kernels import cpu as KC

    own = getattr(KC, "cache_sizes", None)
    if own is not None:
        found = own()
        return {"l2_bytes": found.l2, "llc_bytes": found.llc, "source": found.source}
    sizes = _sysfs_caches()
    llc = sizes[max(sizes)] if sizes else None
    return {"l2_bytes": sizes.get(2), "llc_bytes": llc, "source": "sysfs"}


def channel_groups(shape: tuple[int, ...], threads: int) -> dict[str, object] | None:
    """How the kernels block the channels of an NCHW ``shape`` (float32): channels per group
    and where a group's second pass is served from ("L2", "LLC" or "memory"), forward (x)
    and backward (x and dy); None when the kernels have no channel-group rule."""
    from bnlab.kernels import cpu as KC

    if len(shape) != 4 or not hasattr(KC, "channel_group"):
        return None
    n, c, hw = shape[0], shape[1], shape[2] * shape[3]
    out: dict[str, object] = {}
    for phase, streams in (("forward", 1), ("backward", 2)):
        out[f"{phase}_channels"] = KC.channel_group(n, c, hw, 4, streams, threads)
        if hasattr(KC, "group_fits"):
            out[f"{phase}_served_by"] = KC.group_fits(n, c, hw, 4, streams, threads)
    return out


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's last-level cache in bytes, from Linux's sysfs (None elsewhere)."""
    sizes = _sysfs_caches()
    return sizes[max(sizes)] if sizes else None


def threading_facts() -> dict[str, object]:
    """Which threading runtimes run the two sides: Numba's threading layer (the one that
    ran, and the one asked for: "default" is Numba's own pick, anything else pinned) and
    torch's parallel backend. Call after a kernel ran (Numba picks its layer on first use)."""
    import numba

    from bnlab.kernels import cpu as KC

    own = getattr(KC, "threading_layer", None)
    try:
        layer = own() if own is not None else numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        layer = None
    info = torch.__config__.parallel_info()
    backend = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if "parallel backend" in line),
        "unknown",
    )
    return {
        "numba_threading_layer": layer,
        "numba_layer_requested": str(numba.config.THREADING_LAYER),
        "layer_source": "bnlab.kernels.cpu" if own is not None else "numba",
        "torch_parallel_backend": backend,
    }


def large_shape(llc_bytes: int | None, channels: int = 64, side: int = 112) -> tuple[int, ...]:
    """(N, channels, side, side) float32, with the smallest N (a multiple of 8) whose tensor
    is at least CACHE_FACTOR x the last-level cache; (64, 64, 112, 112) without a cache size."""
    per_sample = channels * side * side * 4
    if not llc_bytes:
        return (64, channels, side, side)
    n = -(-CACHE_FACTOR * llc_bytes // per_sample)
    return (max(8, -(-n // 8) * 8), channels, side, side)


def bandwidths(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Read-only, write-only and copy bandwidth in GB/s on buffers of ``nbytes`` (float32),
    every buffer written once before timing (its pages faulted in).

    read: ``src.sum()``, nbytes / time; write: ``dst.fill_(1.0)``, nbytes / time (with the
    write-allocate reads that ordinary stores make); copy: ``dst.copy_(src)``, counted as
    3 * nbytes / time (read src, read dst's lines for ownership, write dst).
    """
    src = torch.empty(nbytes // 4).uniform_()
    dst = torch.zeros_like(src)
    fns = {"read": src.sum, "write": lambda: dst.fill_(1.0), "copy": lambda: dst.copy_(src)}
    m = measure_interleaved(fns, repeats=repeats)
    moved = {"read": nbytes, "write": nbytes, "copy": 3 * nbytes}
    return {f"{k}_GBps": moved[k] / m[k].median / 1e9 for k in fns}


def first_touch_seconds(nbytes: int, repeats: int = 5) -> float:
    """Seconds to allocate a fresh ``nbytes`` tensor and write it, minus writing a
    pre-faulted one: what the operating system charges for new pages (page faults and
    zeroing), which every implementation that returns a new tensor pays for it."""
    buf = torch.zeros(nbytes // 4)
    fns = {"fresh": lambda: torch.empty(nbytes // 4).fill_(1.0), "reused": lambda: buf.fill_(1.0)}
    m = measure_interleaved(fns, repeats=repeats)
    return max(0.0, m["fresh"].median - m["reused"].median)


def _eager_bn_relu(x, rm, rv, w, b, eps):
    return TF.batch_norm(x, rm, rv, w, b, False, 0.0, eps).relu_()


_COMPILED: dict[str, Callable] = {}


def compiled_batch_norm() -> dict[str, Callable]:
    """``torch.compile(F.batch_norm)`` (inductor, static shapes: one specialization per shape,
    as a model of fixed shape gets) and the compiled eval BN + ReLU; made once per process."""
    if not _COMPILED:
        import torch._dynamo

        # one specialization per benchmark shape and layout: allow them all
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        _COMPILED["bn"] = torch.compile(TF.batch_norm, dynamic=False)
        _COMPILED["bn_relu"] = torch.compile(_eager_bn_relu, dynamic=False)
    return _COMPILED


def implementations(large: bool, compiled: bool = False) -> dict[str, dict[str, Callable]]:
    """impl -> {"bn": batch_norm-like f(x, rm, rv, w, b, training, momentum, eps),
    "bn_relu": eval BN + ReLU f(x, rm, rv, w, b, eps)}. bnlab's from-scratch version
    (tensor operations, several temporaries) is compared on the cache-resident shapes only;
    ``compiled`` adds torch.compile(F.batch_norm) (:data:`COMPILED_MODES` only)."""
    from bnlab.kernels.autograd import batch_norm as kernel_bn  # numba: only when measured
    from bnlab.kernels.autograd import batch_norm_relu

    impls = {
        "torch": {"bn": TF.batch_norm, "bn_relu": _eager_bn_relu},
        "bnlab kernel": {
            "bn": lambda *a: kernel_bn(*a, backend="cpu"),
            "bn_relu": lambda *a: batch_norm_relu(*a, backend="cpu"),
        },
    }
    if not large:
        impls["bnlab scratch"] = {
            "bn": F.batch_norm,
            "bn_relu": lambda x, rm, rv, w, b, eps: F.batch_norm(
                x, rm, rv, w, b, False, 0.0, eps
            ).relu_(),
        }
    if compiled:
        impls[COMPILE] = dict(compiled_batch_norm(), modes=COMPILED_MODES)
    return impls


def _key(shape) -> str:
    return "x".join(map(str, shape))


def _case_key(shape, layout: str) -> str:
    return _key(shape) + ("" if layout == "contiguous" else ".cl")


def measure_shape(
    shape: tuple[int, ...],
    layout: str = "contiguous",
    repeats: int = 7,
    large: bool = False,
    modes: tuple[str, ...] = MODES,
    bandwidths: dict[str, float] | None = None,
    compiled: bool = False,
    impls: tuple[str, ...] | None = None,
) -> list[dict]:
    """The cases of one shape and layout: every implementation in every mode, float32.

    Inputs are filled (so their pages are faulted in) before any timing. The gradients
    are reset before each backward, as ``zero_grad(set_to_none=True)`` does, so no call
    pays for accumulating into the previous one's. ``bandwidths`` (:func:`bandwidths` on
    buffers of this tensor's size) adds each case's floor (:func:`bnlab.bench.cases.cases_from`).
    ``compiled``: torch.compile(F.batch_norm) too, its first call (the compile) timed apart
    as ``compile_s``. ``impls``: only these implementations.
    """
    g = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    c = shape[1]
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    xg, dy = (
        x.clone().requires_grad_(),
        torch.randn(shape, generator=g).contiguous(memory_format=fmt),
    )
    found = implementations(large, compiled)
    chosen = {n: i for n, i in found.items() if impls is None or n in impls}

    def step(mode: str, impl: dict[str, Callable]) -> Callable[[], object]:
        bn, bn_relu = impl["bn"], impl["bn_relu"]
        if mode == "train fwd+bwd":

            def fwd_bwd():
                xg.grad = w.grad = b.grad = None
                bn(xg, rm, rv, w, b, True, 0.1, 1e-5).backward(dy)

            return fwd_bwd

        def forward():
            with torch.no_grad():
                if mode == "eval+relu":
                    return bn_relu(x, rm, rv, w, b, 1e-5)
                return bn(x, rm, rv, w, b, mode == "train fwd", 0.1, 1e-5)

        return forward

    measured, compile_s = {}, {}
    for mode in modes:
        fns = {n: step(mode, i) for n, i in chosen.items() if mode in i.get("modes", MODES)}
        if COMPILE in fns:  # the compile, once, outside the timed loop
            start = time.perf_counter()
            fns[COMPILE]()
            compile_s[mode] = time.perf_counter() - start
        measured[mode] = measure_interleaved(fns, repeats)
    threads = next(iter(measured[modes[0]].values())).task_spec.num_threads
    cases = cases_from(measured, shape, layout, "cpu", None, bandwidths=bandwidths, threads=threads)
    for case in cases:
        if case["impl"] == COMPILE:
            case["compile_s"] = compile_s[case["mode"]]
    return cases


def tiny_like(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tiny input of the same kind and channel count, (16, C) or (2, C, 4, 4): a call's
    time there is almost all per-call overhead."""
    return (16, shape[1]) if len(shape) == 2 else (2, shape[1], 4, 4)


def per_call_seconds(shape: tuple[int, ...], repeats: int = 7) -> dict[str, dict[str, float]]:
    """mode -> impl -> median seconds of one call at :func:`tiny_like` (shape), torch and the
    kernel, train fwd+bwd and eval+relu: the fixed cost of a call, apart from its passes."""
    cases = measure_shape(
        tiny_like(shape), repeats=repeats, large=True, modes=("train fwd+bwd", "eval+relu")
    )
    out: dict[str, dict[str, float]] = {}
    for r in cases:
        out.setdefault(r["mode"], {})[r["impl"]] = r["median_s"]
    return out


def format_cases(cases: list[dict]) -> str:
    """A text table of cases: median (IQR) in ms, x torch, the floor (ms) and the share of
    the floor reached (floor / median: 100% is the floor)."""
    head = (
        f"{'shape':<20}{'layout':<15}{'mode':<15}{'implementation':<15}"
        f"{'median ms':>10}{'IQR ms':>9}{'x torch':>9}{'floor ms':>10}{'of floor':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in cases:
        floor = r.get("floor_s")
        lines.append(
            f"{str(tuple(r['shape'])):<20}{r['layout']:<15}{r['mode']:<15}{r['impl']:<15}"
            f"{r['median_s'] * 1e3:>10.3f}{r['iqr_s'] * 1e3:>9.3f}{r['speedup_vs_torch']:>9.2f}"
            + ("" if floor is None else f"{floor * 1e3:>10.3f}{100 * r['floor_fraction']:>8.0f}%")
        )
    return "\n".join(lines)


def kernel_summary(cases: list[dict]) -> dict[str, dict]:
    """Per shape and layout, what the results store holds: the kernel's speedups over torch
    by mode and its medians (seconds), its speedups over torch.compile, every
    implementation's medians and share of the floor, the floors, and the compile times."""
    out: dict[str, dict] = {}
    medians: dict[tuple[str, str], float] = {}
    for r in cases:
        medians[(_case_key(r["shape"], r["layout"]), r["impl"], r["mode"])] = r["median_s"]
    for r in cases:
        key = _case_key(r["shape"], r["layout"])
        entry = out.setdefault(key, {"shape": r["shape"], "layout": r["layout"]})
        mode, impl = r["mode"], r["impl"]
        entry.setdefault("medians", {}).setdefault(impl, {})[mode] = r["median_s"]
        if r.get("floor_s") is not None:
            entry["traffic"] = r["traffic"]
            entry.setdefault("floor_s", {})[mode] = r["floor_s"]
            entry.setdefault("floor_unblocked_s", {})[mode] = r["floor_unblocked_s"]
            entry.setdefault("floor_fraction", {}).setdefault(impl, {})[mode] = round(
                r["floor_fraction"], 3
            )
        if r.get("compile_s") is not None:
            entry.setdefault("compile_s", {})[mode] = round(r["compile_s"], 2)
        if impl != "bnlab kernel":
            continue
        entry[mode] = round(r["speedup_vs_torch"], 3)
        entry.setdefault("median_s", {})[mode] = r["median_s"]
        compiled = medians.get((key, COMPILE, mode))
        if compiled is not None:
            entry.setdefault("vs torch.compile", {})[mode] = round(compiled / r["median_s"], 3)
    return {k: v for k, v in out.items() if "median_s" in v}


# glibc's malloc returns blocks above its mmap threshold (at most 32 MiB) to the operating
# system when they are freed, so every new large output is faulted in again, page by page,
# and zeroed by the kernel; with these settings freed memory stays mapped and is reused.
# Every implementation runs in the same process, so all get the same allocator.
WARM_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def allocator() -> str:
    """Which allocator setting this process runs with: "default" or "warm" (see above)."""
    warm = all(os.environ.get(k) == v for k, v in WARM_ALLOCATOR_ENV.items())
    return "warm" if warm else "default"


def cpu_cases(
    quick: bool = False, repeats: int | None = None, large: bool = True
) -> tuple[list[dict], dict]:
    """Every CPU case of ``make bench`` and the machine facts they are read against.

    Shapes: RATIO_SHAPES contiguous (torch, the kernel, torch.compile) and (32, 64, 56, 56)
    channels_last (torch, the kernel), every mode; unless ``large`` is False, the shape
    CACHE_FACTOR x the last-level cache, contiguous (:data:`LARGE_MODES`, torch.compile
    too) and channels_last (train fwd+bwd). Each case carries its floor, from bandwidths
    measured on buffers of its own size. ``quick``: fewer shapes and repeats.
    """
    repeats = repeats or (3 if quick else 7)
    caches = cache_sizes()
    big = large_shape(caches["llc_bytes"])
    plan = [(s, "contiguous", MODES, True) for s in (RATIO_SHAPES[::2] if quick else RATIO_SHAPES)]
    plan.append(((32, 64, 56, 56), "channels_last", MODES, False))
    if large:
        plan += [
            (big, "contiguous", LARGE_MODES, True),
            (big, "channels_last", ("train fwd+bwd",), False),
        ]
    by_size: dict[str, dict[str, float]] = {}
    cases = []
    for shape, layout, modes, compiled in plan:
        nbytes = 4 * math.prod(shape)
        if _key(shape) not in by_size:
            by_size[_key(shape)] = bandwidths(nbytes, repeats)
        is_large = shape == big
        cases += measure_shape(
            shape,
            layout,
            repeats,
            is_large,
            modes,
            by_size[_key(shape)],
            compiled,
            impls=("torch", "bnlab kernel", COMPILE),
        )
    dram = by_size.get(_key(big), {}) if large else {}
    per_call = {
        _key(tiny_like(s)): per_call_seconds(s, repeats) for s in ((32, 64, 56, 56), (1024, 512))
    }
    facts = {
        "allocator": allocator(),
        "threads": torch.get_num_threads(),
        **threading_facts(),
        "l2_bytes": caches["l2_bytes"],
        "llc_bytes": caches["llc_bytes"],
        "cache_source": caches["source"],
        "read_GBps": dram.get("read_GBps"),
        "write_GBps": dram.get("write_GBps"),
        "copy_GBps": dram.get("copy_GBps"),
        "bandwidths_by_size": by_size,
        "large_shape": list(big) if large else None,
        "channel_slab_bytes": 4 * big[0] * big[2] * big[3] if large else None,
        "channel_groups": channel_groups(big, torch.get_num_threads()) if large else None,
        "first_touch_s": first_touch_seconds(4 * math.prod(big), repeats) if large else None,
        "per_call_s": per_call,
    }
    return cases, facts


def _find(cases: list[dict], shape, mode: str, impl: str, layout: str = "contiguous"):
    for r in cases:
        same = tuple(r["shape"]) == tuple(shape) and r["layout"] == layout
        if same and r["mode"] == mode and r["impl"] == impl:
            return r
    return None


def _large_case(cases: list[dict], facts: dict | None = None) -> dict | None:
    """The kernel's fwd+bwd at the large shape (``facts["large_shape"]``; without facts, the
    largest contiguous (N, C, H, W) shape beyond RATIO_SHAPES that has a floor): the shape
    where the floor is DRAM's."""
    big = (facts or {}).get("large_shape")
    if big:
        return _find(cases, big, "train fwd+bwd", "bnlab kernel")
    found = [
        r
        for r in cases
        if r["impl"] == "bnlab kernel"
        and r["mode"] == "train fwd+bwd"
        and r["layout"] == "contiguous"
        and len(r["shape"]) == 4
        and tuple(r["shape"]) not in RATIO_SHAPES
        and r.get("floor_s") is not None
    ]
    return max(found, key=lambda r: math.prod(r["shape"]), default=None)


def _ratio_bound(kernel: dict, base: dict, target: float, facts: dict | None) -> tuple[str, dict]:
    """What bounds a speed ratio that missed its target, measured: the floor (the best
    ratio it allows), the per-call overhead against the time to shed, or the kernel's loops."""
    gap = kernel["median_s"] - base["median_s"] / target  # seconds to shed to meet the goal
    figures: dict[str, float | None] = dict.fromkeys(
        ("floor_allows", "kernel_floor_fraction", "overhead_s")
    )
    figures["gap_s"] = gap
    if kernel.get("floor_s"):
        figures["floor_allows"] = base["median_s"] / kernel["floor_s"]
        figures["kernel_floor_fraction"] = kernel["floor_fraction"]
        figures["baseline_floor_fraction"] = base.get("floor_fraction")
    per_call = (facts or {}).get("per_call_s", {}).get(_key(tiny_like(tuple(kernel["shape"]))))
    if per_call and base["impl"] == "torch" and kernel["mode"] in per_call:
        calls = per_call[kernel["mode"]]
        figures["overhead_s"] = calls["bnlab kernel"] - calls["torch"]
    best, frac, over = (
        figures["floor_allows"],
        figures["kernel_floor_fraction"],
        figures["overhead_s"],
    )
    if best is not None and best < target:
        text = (
            f"the floor: {kernel['traffic']} traffic at the bandwidths measured at this size "
            f"allows at most {best:.2f}x"
        )
    elif over is not None and over >= 0.5 * gap:
        tiny = tiny_like(tuple(kernel["shape"]))
        text = (
            f"per-call overhead: {1e6 * over:.0f} us more than torch per call (at {tiny}), "
            f"against {1e6 * gap:.0f} us to shed"
        )
    elif frac is not None:
        text = f"the kernel's loops: {100 * frac:.0f}% of its floor, which allows {best:.2f}x"
        if base["impl"] == COMPILE and figures.get("baseline_floor_fraction") is not None:
            text += f"; torch.compile reaches {100 * figures['baseline_floor_fraction']:.0f}%"
    else:
        text = "not measured: no floor for this case"
    return text, figures


def _floor_bound(cases: list[dict], fb: dict, facts: dict | None) -> tuple[str, dict]:
    """Which phase keeps forward + backward from its floor, and the fresh pages' share."""
    fwd = _find(cases, fb["shape"], "train fwd", "bnlab kernel")
    figures: dict[str, float | None] = {
        "forward_floor_fraction": None,
        "backward_floor_fraction": None,
    }
    parts = []
    if fwd is not None and fwd.get("floor_s") is not None:
        bwd_time = fb["median_s"] - fwd["median_s"]
        bwd_floor = fb["floor_s"] - fwd["floor_s"]
        figures["forward_floor_fraction"] = fwd["floor_fraction"]
        figures["backward_floor_fraction"] = bwd_floor / bwd_time if bwd_time > 0 else None
        parts.append(f"forward at {100 * fwd['floor_fraction']:.0f}% of its floor")
        if figures["backward_floor_fraction"] is not None:
            parts.append(f"backward at {100 * figures['backward_floor_fraction']:.0f}%")
    groups = (facts or {}).get("channel_groups") or {}
    if groups.get("backward_served_by"):
        figures["backward_served_by"] = groups["backward_served_by"]
        parts.append(
            f"a backward group ({groups['backward_channels']} channels of x and dy) is re-read "
            f"from {groups['backward_served_by']}"
        )
    touch = (facts or {}).get("first_touch_s")
    if touch:
        figures["fresh_pages_s"] = 2 * touch  # y and dx
        if 2 * touch > 0.05 * fb["median_s"]:
            parts.append(
                f"fresh output pages (y, dx) cost {1e3 * 2 * touch:.0f} ms of its "
                f"{1e3 * fb['median_s']:.0f} ms"
            )
    return "; ".join(parts) or "not measured: no forward case", figures


def goals(cases: list[dict], facts: dict | None = None) -> list[dict]:
    """The course's targets for the CPU kernel, judged on the medians of ``cases``; each
    missed goal carries what bounds it (``bound``, and its figures in ``bound_figures``),
    measured with ``facts`` (per-call overhead, fresh pages) where given."""
    image = RATIO_SHAPES[:2]
    wanted = [
        (f"train fwd+bwd >= 2x torch at {s}", s, "train fwd+bwd", "torch", 2.0) for s in image
    ]
    wanted.append(
        ("train fwd+bwd >= 1x torch at (1024, 512)", (1024, 512), "train fwd+bwd", "torch", 1.0)
    )
    wanted += [
        (f"eval BN+ReLU >= 1.5x torch's batch_norm + relu_ at {s}", s, "eval+relu", "torch", 1.5)
        for s in RATIO_SHAPES
    ]
    compiled = "train fwd+bwd >= 1x torch.compile(F.batch_norm) at {}"
    wanted += [(compiled.format(s), s, "train fwd+bwd", COMPILE, 1.0) for s in image]
    out = []
    for what, shape, mode, baseline, target in wanted:
        kernel, base = (
            _find(cases, shape, mode, "bnlab kernel"),
            _find(cases, shape, mode, baseline),
        )
        if kernel is None or base is None:
            continue
        value = base["median_s"] / kernel["median_s"]
        goal = {"what": what, "value": value, "target": target, "met": value >= target}
        if not goal["met"]:
            goal["bound"], goal["bound_figures"] = _ratio_bound(kernel, base, target, facts)
        out.append(goal)
    fb = _large_case(cases, facts)
    if fb is not None and fb.get("floor_fraction") is not None:
        what = (
            f"train fwd+bwd >= 90% of its read/write floor at {tuple(fb['shape'])} "
            f"(floor time / measured time, channel-blocked traffic)"
        )
        value = fb["floor_fraction"]
        goal = {"what": what, "value": value, "target": 0.9, "met": value >= 0.9}
        if not goal["met"]:
            goal["bound"], goal["bound_figures"] = _floor_bound(cases, fb, facts)
        out.append(goal)
    return out


def goals_text(found: list[dict]) -> str:
    """The goals on one line, as the store and the README show them."""
    met = sum(g["met"] for g in found)
    parts = [
        f"{'met' if g['met'] else 'NOT met'}: {g['what']} ({g['value']:.2f}"
        + ("" if g["met"] or not g.get("bound") else f"; bound: {g['bound']}")
        + ")"
        for g in found
    ]
    return f"{met} of {len(found)} met; " + "; ".join(parts)


def _mib(nbytes: int | None) -> str:
    return "unknown" if not nbytes else f"{nbytes / 2**20:.0f} MiB"


def machine_text(facts: dict) -> str:
    """The machine facts on one line."""
    layer, asked = facts.get("numba_threading_layer"), facts.get("numba_layer_requested")
    text = (
        f"{facts['threads']} threads (Numba threading layer {layer}, asked for {asked}; torch "
        f"{facts.get('torch_parallel_backend')}); L2 {_mib(facts.get('l2_bytes'))}, "
        f"last-level cache {_mib(facts.get('llc_bytes'))}"
    )
    if facts.get("read_GBps"):
        text += (
            f"; at {tuple(facts['large_shape'])}: read {facts['read_GBps']:.1f}, write "
            f"{facts['write_GBps']:.1f}, copy {facts['copy_GBps']:.1f} GB/s (copy counts 3 bytes "
            f"per byte: write-allocate); a fresh output costs "
            f"{1e3 * facts['first_touch_s']:.0f} ms of page faults"
        )
    for tiny, modes in facts.get("per_call_s", {}).items():
        calls = modes.get("train fwd+bwd", {})
        if calls:
            text += (
                f"; one fwd+bwd call at ({tiny.replace('x', ', ')}): torch "
                f"{1e6 * calls['torch']:.0f} us, kernel {1e6 * calls['bnlab kernel']:.0f} us"
            )
    return text


def record_cpu(cases: list[dict], facts: dict) -> None:
    """Put the kernel's figures in the results store, one entry per shape and layout, the
    machine facts they were measured against, and the goals judged on them
    (bnlab.teaching.results, table "bench")."""
    from bnlab.teaching.results import record

    alloc = facts["allocator"]
    record(
        f"bench.cpu.{alloc}.machine",
        {k: v for k, v in facts.items() if k != "allocator"},
        f"machine, {alloc} allocator: threads and threading layers, caches, read/write/copy "
        "bandwidth, fresh pages, per-call time",
        machine_text(facts),
        table="bench",
    )
    for key, entry in kernel_summary(cases).items():
        rows = [
            r
            for r in cases
            if r["impl"] == "bnlab kernel" and _case_key(r["shape"], r["layout"]) == key
        ]
        iqr = {r["mode"]: r["iqr_s"] / r["median_s"] for r in rows}
        parts = [f"{m} {entry[m]:.2f}x" for m in MODES if m in entry]
        for mode, ratio in entry.get("vs torch.compile", {}).items():
            parts.append(f"{mode} {ratio:.2f}x torch.compile")
        kernel_floor = entry.get("floor_fraction", {}).get("bnlab kernel", {})
        if "train fwd+bwd" in kernel_floor:
            parts.append(f"fwd+bwd at {100 * kernel_floor['train fwd+bwd']:.0f}% of its floor")
        record(
            f"bench.cpu.{alloc}.{key}",
            {**entry, "iqr_fraction": {m: round(v, 3) for m, v in iqr.items()}},
            f"CPU kernel speed vs torch (torch's median / the kernel's), {tuple(entry['shape'])} "
            f"{entry['layout']}, float32, {facts['threads']} threads, {alloc} allocator",
            "; ".join(parts),
            table="bench",
        )
    found = goals(cases, facts)
    record(
        f"bench.cpu.{alloc}.goals",
        found,
        f"the kernel's CPU goals, {alloc} allocator: met or not, and what bounds each miss",
        goals_text(found),
        table="bench",
    )


def stored_kernel_table(data: dict) -> list[dict]:
    """The kernel figures ``make bench`` recorded (see :func:`record_cpu`), one row each."""
    rows = []
    for key, f in sorted(data["figures"].items()):
        if key.startswith("bench.cpu.") and not key.endswith((".machine", ".goals")):
            rows.append({"key": key, "allocator": key.split(".")[2], **f["value"]})
    return rows


def stored_floor_case(data: dict) -> dict | None:
    """The warm allocator's large-shape entry :func:`record_cpu` stored, when it holds the
    floors (``floor_s``, ``floor_unblocked_s``, ``medians``); None for an older store.
    Notebook 04 draws it against the read/write floor."""
    figures = data["figures"]
    machine = figures.get("bench.cpu.warm.machine", {}).get("value", {})
    key = "x".join(map(str, machine.get("large_shape") or ()))
    entry = figures.get(f"bench.cpu.warm.{key}", {}).get("value", {})
    return entry if entry.get("floor_s") else None


def format_stored_table(data: dict) -> str:
    """What notebook 04 prints from the store: each allocator's machine line, the ratio of
    torch's median time to the kernel's per case and mode, the kernel's ratio to
    torch.compile and its share of the floor in fwd+bwd, and the goals judged on them.

    data: the results store (``bnlab.teaching.results.load()``). A test compares this text,
    rendered from the current store, with notebook 04's stored output.
    """
    table, figures = stored_kernel_table(data), data["figures"]
    if not table:
        return "no benchmark figures yet: run `make bench` to fill this table"
    lines = []
    allocators = [a for a in ("default", "warm") if f"bench.cpu.{a}.machine" in figures]
    for alloc in allocators:
        m = figures[f"bench.cpu.{alloc}.machine"]
        lines.append(f"{alloc} allocator: {m['text']} (make bench, {m['recorded']})")
    lines.append(
        f"\n{'allocator':<10}{'shape':<22}{'layout':<15}"
        + "".join(f"{mode:>15}" for mode in MODES)
        + f"{'fwd+bwd x compile':>19}{'fwd+bwd of floor':>18}"
    )
    for r in table:
        floor = r.get("floor_fraction", {}).get("bnlab kernel", {}).get("train fwd+bwd")
        compiled = r.get("vs torch.compile", {}).get("train fwd+bwd")
        lines.append(
            f"{r['allocator']:<10}{str(tuple(r['shape'])):<22}{r['layout']:<15}"
            + "".join(f"{r[mode]:>14.2f}x" if mode in r else f"{'':>15}" for mode in MODES)
            + (f"{compiled:>18.2f}x" if compiled is not None else f"{'':>19}")
            + (f"{100 * floor:>17.0f}%" if floor is not None else "")
        )
    for alloc in allocators:
        lines.append(f"\ngoals, {alloc} allocator:")
        for g in figures[f"bench.cpu.{alloc}.goals"]["value"]:
            lines.append(f"  {'met    ' if g['met'] else 'NOT met'}  {g['what']}: {g['value']:.2f}")
            if not g["met"] and g.get("bound"):
                lines.append(f"           bound: {g['bound']}")
    return "\n".join(lines)
