"""One benchmark case per (shape, layout, implementation, mode): the schema both
``make bench`` (CPU) and ``make bench-gpu`` write, the byte counts they share, and the
read/write floor a case is judged against.

Traffic is counted in full passes over the tensor, reads and writes apart, at the
algorithm's minimum. Without channel blocking (:data:`UNBLOCKED`), every pass streams
from memory: training forward 2 reads + 1 write (read x for the statistics; read x,
write y), forward + backward 6 + 2 (then read x and dy for the two per-channel sums;
read x and dy, write dx), eval 1 + 1, eval fused with ReLU 1 + 1. With channel blocking
(:data:`BLOCKED`), a group of channels is reduced and then normalized (or its dx
computed) while it is still in cache, so the second read of each phase is served by the
cache: forward 1 + 1, forward + backward 3 + 2 (5 passes). That holds when one group's
slab (x, and dy in the backward) fits in the cache; a channels_last tensor cannot be
blocked by channel (a channel's values are spread over all of memory), so its minimum
is the unblocked count.

The floor of a case (:func:`floor_seconds`): bytes read / read bandwidth + bytes written /
write bandwidth, with the bandwidths measured on this machine (``bnlab.bench.cpu``).

Serves notebook 04 (``make bench``, ``make bench-gpu``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# mode -> (passes read, passes written)
UNBLOCKED = {"train fwd": (2, 1), "train fwd+bwd": (6, 2), "eval": (1, 1), "eval+relu": (1, 1)}
BLOCKED = {"train fwd": (1, 1), "train fwd+bwd": (3, 2), "eval": (1, 1), "eval+relu": (1, 1)}
TRAFFIC = {"blocked": BLOCKED, "unblocked": UNBLOCKED}
PASSES = {mode: sum(rw) for mode, rw in UNBLOCKED.items()}  # 3, 8, 2, 2


def traffic_kind(shape: Iterable[int], layout: str) -> str:
    """ "blocked" for an (N, C, H, W) tensor in contiguous NCHW, whose channels can be
    blocked; "unblocked" for channels_last and for (N, C) inputs."""
    return "blocked" if layout == "contiguous" and len(list(shape)) > 2 else "unblocked"


def floor_seconds(
    mode: str, nbytes: int, read_GBps: float, write_GBps: float, kind: str = "blocked"
) -> float:
    """The read/write floor of one call: reads * nbytes / read bandwidth + writes * nbytes /
    write bandwidth, with (reads, writes) in passes from :data:`TRAFFIC` [kind][mode]."""
    reads, writes = TRAFFIC[kind][mode]
    return reads * nbytes / (read_GBps * 1e9) + writes * nbytes / (write_GBps * 1e9)


def cases_from(
    measured: dict[str, dict[str, object]],
    shape: Iterable[int],
    layout: str,
    device: str,
    limit_GBps: float | None,
    itemsize: int = 4,
    bandwidths: dict[str, float] | None = None,
    **extra,
) -> list[dict]:
    """Case dicts from ``measured[mode][impl]`` (anything with ``.median``, ``.iqr`` in s,
    e.g. a torch.utils.benchmark Measurement), "torch" among the implementations.

    Each case: device, shape, layout, dtype, impl, mode, median_s, iqr_s, repeats (when the
    measurement has ``times``), speedup_vs_torch (torch's median / this median), passes
    (unblocked), bandwidth_GBps (passes * nbytes / median) and bandwidth_fraction (of
    ``limit_GBps``, peak on a GPU; None without a limit), then ``extra``.

    ``bandwidths`` ({"read_GBps", "write_GBps"}, measured on buffers the size of this
    tensor) adds the floor: traffic ("blocked" or "unblocked", :func:`traffic_kind`),
    floor_s (that traffic at those bandwidths), floor_unblocked_s, and floor_fraction
    (floor_s / median_s: 1 is the floor reached).
    """
    shape = [int(d) for d in shape]
    nbytes = math.prod(shape) * itemsize
    kind = traffic_kind(shape, layout)
    cases = []
    for mode, per_impl in measured.items():
        torch_median = float(per_impl["torch"].median)
        for impl, m in per_impl.items():
            median = float(m.median)
            bandwidth = PASSES[mode] * nbytes / median / 1e9
            case = {
                "device": device,
                "shape": shape,
                "layout": layout,
                "dtype": {4: "float32", 8: "float64"}[itemsize],
                "impl": impl,
                "mode": mode,
                "median_s": median,
                "iqr_s": float(m.iqr),
                "repeats": len(m.times) if hasattr(m, "times") else None,
                "speedup_vs_torch": torch_median / median,
                "passes": PASSES[mode],
                "bandwidth_GBps": bandwidth,
                "bandwidth_fraction": bandwidth / limit_GBps if limit_GBps else None,
            }
            if bandwidths:
                rw = (bandwidths["read_GBps"], bandwidths["write_GBps"])
                floor = floor_seconds(mode, nbytes, *rw, kind)
                case |= {
                    "traffic": kind,
                    "floor_s": floor,
                    "floor_unblocked_s": floor_seconds(mode, nbytes, *rw, "unblocked"),
                    "floor_fraction": floor / median,
                }
            cases.append(case | extra)
    return cases


def format_goals(goals: list[dict]) -> str:
    """One line per goal: met / NOT met, the measured value, and for a miss what bounds it."""
    lines = []
    for g in goals:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}"
        line = f"{'met    ' if g['met'] else 'NOT met'}  {g['what']}: {value}"
        if not g["met"] and g.get("bound"):
            line += f"\n         bound: {g['bound']}"
        lines.append(line)
    return "\n".join(lines)
