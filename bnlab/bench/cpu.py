"""BatchNorm on the CPU, bnlab's kernels vs torch: the cases of ``make bench``.

Each case is one (shape, memory layout, implementation, mode) measured with
``torch.utils.benchmark`` (:func:`bnlab.bench.timing.measure_interleaved`: the
implementations interleaved, median and interquartile range of the repeats).

Bytes are counted as the algorithm's minimum traffic, in full passes over the tensor:

- training forward, 3: read x for the statistics; read x and write y;
- training forward + backward, 8: the forward's 3, then read x and dy for the two
  per-channel sums, and read x and dy and write dx;
- eval, and eval fused with ReLU, 2: read x, write y (torch's ``batch_norm`` followed by
  ``relu_`` makes 4, which is what fusing saves).

A bandwidth figure (a fraction of this machine's copy bandwidth) is given only for
shapes at least 4x larger than the last-level cache; smaller ones are partly served by
the cache, and are reported as speed ratios to torch only.

Serves notebook 04 (``make bench``).
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as TF

from bnlab.bench.cases import PASSES, cases_from, format_goals  # noqa: F401 (re-exported)
from bnlab.bench.timing import measure_interleaved
from bnlab.nn import functional as F

RATIO_SHAPES = [(32, 64, 56, 56), (256, 64, 28, 28), (1024, 512)]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("train fwd", "train fwd+bwd", "eval", "eval+relu")
CACHE_FACTOR = 4  # a bandwidth figure needs a tensor this many times the last-level cache


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's last-level cache in bytes, from Linux's sysfs (None elsewhere)."""
    best = (0, None)
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        path = Path(index)
        try:
            level = int((path / "level").read_text())
            kind = (path / "type").read_text().strip()
            size = (path / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        nbytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best, (level, nbytes), key=lambda t: t[0])
    return best[1]


def large_shape(llc_bytes: int | None, channels: int = 64, side: int = 112) -> tuple[int, ...]:
    """(N, channels, side, side) float32, with the smallest N (a multiple of 8) whose tensor
    is at least CACHE_FACTOR x the last-level cache; (64, 64, 112, 112) without a cache size."""
    per_sample = channels * side * side * 4
    if not llc_bytes:
        return (64, channels, side, side)
    n = -(-CACHE_FACTOR * llc_bytes // per_sample)
    return (max(8, -(-n // 8) * 8), channels, side, side)


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + written per second) of a tensor of ``nbytes``,
    into a pre-faulted destination."""
    src = torch.empty(nbytes // 4).uniform_()
    dst = torch.zeros_like(src)
    m = measure_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats)["copy"]
    return 2 * nbytes / m.median / 1e9


def first_touch_seconds(nbytes: int, repeats: int = 5) -> float:
    """Seconds to allocate a fresh ``nbytes`` tensor and write it, minus writing a
    pre-faulted one: what the operating system charges for new pages (page faults and
    zeroing), which every implementation that returns a new tensor pays for it."""
    buf = torch.zeros(nbytes // 4)
    fns = {"fresh": lambda: torch.empty(nbytes // 4).fill_(1.0), "reused": lambda: buf.fill_(1.0)}
    m = measure_interleaved(fns, repeats=repeats)
    return max(0.0, m["fresh"].median - m["reused"].median)


def implementations(large: bool) -> dict[str, dict[str, Callable]]:
    """impl -> {"bn": batch_norm-like f(x, rm, rv, w, b, training, momentum, eps),
    "bn_relu": eval BN + ReLU f(x, rm, rv, w, b, eps)}. bnlab's from-scratch version
    (tensor operations, several temporaries) is compared on the cache-resident shapes only."""
    from bnlab.kernels.autograd import batch_norm as kernel_bn  # numba: only when measured
    from bnlab.kernels.autograd import batch_norm_relu

    impls = {
        "torch": {
            "bn": TF.batch_norm,
            "bn_relu": lambda x, rm, rv, w, b, eps: TF.batch_norm(
                x, rm, rv, w, b, False, 0.0, eps
            ).relu_(),
        },
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
    return impls


def measure_shape(
    shape: tuple[int, ...],
    layout: str = "contiguous",
    repeats: int = 7,
    copy_GBps: float | None = None,
    large: bool = False,
    modes: tuple[str, ...] = MODES,
) -> list[dict]:
    """The cases of one shape and layout: every implementation in every mode, float32.

    Inputs are filled (so their pages are faulted in) before any timing. The gradients
    are reset before each backward, as ``zero_grad(set_to_none=True)`` does, so no call
    pays for accumulating into the previous one's. ``copy_GBps``: given for shapes at
    least CACHE_FACTOR x the last-level cache, it turns times into bandwidth fractions.
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
    impls = implementations(large)

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

    measured = {
        mode: measure_interleaved({n: step(mode, impl) for n, impl in impls.items()}, repeats)
        for mode in modes
    }
    threads = next(iter(measured[modes[0]].values())).task_spec.num_threads
    return cases_from(measured, shape, layout, "cpu", copy_GBps, threads=threads)


def format_cases(cases: list[dict]) -> str:
    """A text table of cases: median (IQR) in ms, x torch, and % of copy bandwidth."""
    head = (
        f"{'shape':<20}{'layout':<15}{'mode':<15}{'implementation':<15}"
        f"{'median ms':>10}{'IQR ms':>9}{'x torch':>9}{'% copy':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in cases:
        frac = r["bandwidth_fraction"]
        lines.append(
            f"{str(tuple(r['shape'])):<20}{r['layout']:<15}{r['mode']:<15}{r['impl']:<15}"
            f"{r['median_s'] * 1e3:>10.3f}{r['iqr_s'] * 1e3:>9.3f}{r['speedup_vs_torch']:>9.2f}"
            f"{'' if frac is None else f'{100 * frac:.0f}%':>8}"
        )
    return "\n".join(lines)


def kernel_summary(cases: list[dict]) -> dict[str, dict]:
    """Per shape and layout, the kernel's median speedups by mode, its medians in seconds and
    its bandwidth fraction (fwd+bwd, large shapes only): what the results store holds."""
    out: dict[str, dict] = {}
    for r in cases:
        if r["impl"] != "bnlab kernel":
            continue
        key = "x".join(map(str, r["shape"])) + ("" if r["layout"] == "contiguous" else ".cl")
        entry = out.setdefault(key, {"shape": r["shape"], "layout": r["layout"]})
        entry[r["mode"]] = round(r["speedup_vs_torch"], 3)
        entry.setdefault("median_s", {})[r["mode"]] = r["median_s"]
        if r["mode"] == "train fwd+bwd" and r["bandwidth_fraction"] is not None:
            entry["fwd+bwd copy fraction"] = round(r["bandwidth_fraction"], 3)
    return out


# glibc's malloc returns blocks above its mmap threshold (at most 32 MiB) to the operating
# system when they are freed, so every new large output is faulted in again, page by page,
# and zeroed by the kernel; with these settings freed memory stays mapped and is reused.
# Both implementations run in the same process, so both get the same allocator.
WARM_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def allocator() -> str:
    """Which allocator setting this process runs with: "default" or "warm" (see above)."""
    import os

    warm = all(os.environ.get(k) == v for k, v in WARM_ALLOCATOR_ENV.items())
    return "warm" if warm else "default"


def cpu_cases(
    quick: bool = False, repeats: int | None = None, large: bool = True
) -> tuple[list[dict], dict]:
    """Every CPU case of ``make bench`` and the machine facts they are read against.

    Shapes: RATIO_SHAPES contiguous, (32, 64, 56, 56) channels_last, and (unless
    ``large`` is False) the shape CACHE_FACTOR x the last-level cache, both layouts,
    where bandwidth fractions are computed. ``quick``: fewer shapes and repeats.
    """
    repeats = repeats or (3 if quick else 7)
    llc = last_level_cache_bytes()
    big = large_shape(llc)
    big_bytes = 4 * int(torch.tensor(big).prod())
    copy = copy_bandwidth(big_bytes if large else 2**28, repeats)
    facts = {
        "allocator": allocator(),
        "threads": torch.get_num_threads(),
        "llc_bytes": llc,
        "copy_GBps": copy,
        "large_shape": list(big) if large else None,
        "first_touch_s": first_touch_seconds(big_bytes, repeats) if large else None,
    }
    plan = [(s, "contiguous", False) for s in (RATIO_SHAPES[::2] if quick else RATIO_SHAPES)]
    plan.append(((32, 64, 56, 56), "channels_last", False))
    if large:
        plan += [(big, "contiguous", True), (big, "channels_last", True)]
    cases = []
    for shape, layout, is_large in plan:
        cases += measure_shape(shape, layout, repeats, copy if is_large else None, is_large)
    return cases, facts


def _case_key(shape, layout: str) -> str:
    return "x".join(map(str, shape)) + ("" if layout == "contiguous" else ".cl")


def record_cpu(cases: list[dict], facts: dict) -> None:
    """Put the kernel's figures in the results store, one entry per shape and layout, and
    the machine facts they were measured against (bnlab.teaching.results, table "bench")."""
    from bnlab.teaching.results import record

    alloc = facts["allocator"]
    copy, llc = facts["copy_GBps"], facts["llc_bytes"]
    touch = facts["first_touch_s"]
    record(
        f"bench.cpu.{alloc}.machine",
        {
            k: facts[k]
            for k in ("threads", "copy_GBps", "llc_bytes", "large_shape", "first_touch_s")
        },
        f"machine, {alloc} allocator: threads, copy bandwidth, last-level cache, fresh pages",
        f"{facts['threads']} threads; copy {copy:.1f} GB/s; last-level cache "
        f"{(llc or 0) / 2**20:.0f} MiB; a fresh {tuple(facts['large_shape'] or ())} output costs "
        f"{1e3 * (touch or 0):.0f} ms of page faults",
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
        if "fwd+bwd copy fraction" in entry:
            parts.append(f"fwd+bwd {100 * entry['fwd+bwd copy fraction']:.0f}% of copy bandwidth")
        record(
            f"bench.cpu.{alloc}.{key}",
            {**entry, "iqr_fraction": {m: round(v, 3) for m, v in iqr.items()}},
            f"CPU kernel speed vs torch (torch's median / the kernel's), {tuple(entry['shape'])} "
            f"{entry['layout']}, float32, "
            f"{facts['threads']} threads, {alloc} allocator",
            "; ".join(parts),
            table="bench",
        )


def stored_kernel_table(data: dict) -> list[dict]:
    """The kernel figures ``make bench`` recorded (see :func:`record_cpu`), one row each."""
    rows = []
    for key, f in sorted(data["figures"].items()):
        if key.startswith("bench.cpu.") and not key.endswith((".machine", ".goals")):
            rows.append({"key": key, "allocator": key.split(".")[2], **f["value"]})
    return rows


def format_stored_table(data: dict) -> str:
    """What notebook 04 prints from the store: each allocator's machine line, the ratio of
    torch's median time to the kernel's per case and mode, and the goals judged on them.

    data: the results store (``bnlab.teaching.results.load()``). A test compares this text,
    rendered from the current store, with notebook 04's stored output.
    """
    table, figures = stored_kernel_table(data), data["figures"]
    if not table:
        return "no benchmark figures yet: run `make bench` to fill this table"
    lines = []
    for alloc in ("default", "warm"):
        m = figures[f"bench.cpu.{alloc}.machine"]
        lines.append(f"{alloc} allocator: {m['text']} (make bench, {m['recorded']})")
    lines.append(
        f"\n{'allocator':<10}{'shape':<22}{'layout':<15}"
        + "".join(f"{mode:>15}" for mode in MODES)
        + f"{'% copy':>8}"
    )
    for r in table:
        frac = r.get("fwd+bwd copy fraction")
        lines.append(
            f"{r['allocator']:<10}{str(tuple(r['shape'])):<22}{r['layout']:<15}"
            + "".join(f"{r[mode]:>14.2f}x" for mode in MODES)
            + ("" if frac is None else f"{100 * frac:>7.0f}%")
        )
    for alloc in ("default", "warm"):
        lines.append(f"\ngoals, {alloc} allocator:")
        for g in figures[f"bench.cpu.{alloc}.goals"]["value"]:
            lines.append(f"  {'met    ' if g['met'] else 'NOT met'}  {g['what']}: {g['value']:.2f}")
    return "\n".join(lines)


def goals(cases: list[dict]) -> list[dict]:
    """The course's targets for the CPU kernel, judged on the medians of ``cases``."""

    def ratio(shape, mode, layout="contiguous"):
        for r in cases:
            same = tuple(r["shape"]) == tuple(shape) and r["layout"] == layout
            if same and r["mode"] == mode and r["impl"] == "bnlab kernel":
                return r
        return None

    wanted = [
        ("train fwd+bwd >= 2x torch at (32, 64, 56, 56)", (32, 64, 56, 56), "train fwd+bwd", 2.0),
        ("train fwd+bwd >= 2x torch at (256, 64, 28, 28)", (256, 64, 28, 28), "train fwd+bwd", 2.0),
        ("train fwd+bwd >= 1x torch at (1024, 512)", (1024, 512), "train fwd+bwd", 1.0),
    ]
    wanted += [
        (f"eval BN+ReLU >= 1.5x torch's batch_norm + relu_ at {s}", s, "eval+relu", 1.5)
        for s in RATIO_SHAPES
    ]
    out = []
    for what, shape, mode, target in wanted:
        r = ratio(shape, mode)
        if r is not None:
            value = r["speedup_vs_torch"]
            out.append({"what": what, "value": value, "target": target, "met": value >= target})
    for r in cases:
        if r["impl"] == "bnlab kernel" and r["mode"] == "train fwd+bwd" and r["bandwidth_fraction"]:
            what = f"train fwd+bwd >= 60% of copy bandwidth at {tuple(r['shape'])} {r['layout']}"
            frac = r["bandwidth_fraction"]
            out.append({"what": what, "value": frac, "target": 0.6, "met": frac >= 0.6})
    return out
