"""One benchmark case per (shape, layout, implementation, mode): the schema both
``make bench`` (CPU) and ``make bench-gpu`` write, and the byte counts they share.

Bytes are the algorithm's minimum traffic, in full passes over the tensor: training
forward 3 (read x for the statistics; read x, write y), forward + backward 8 (then read
x and dy for the two per-channel sums; read x and dy, write dx), eval 2 (read x, write
y), eval fused with ReLU 2.

Serves notebook 04 (``make bench``, ``make bench-gpu``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval": 2, "eval+relu": 2}


def cases_from(
    measured: dict[str, dict[str, object]],
    shape: Iterable[int],
    layout: str,
    device: str,
    limit_GBps: float | None,
    itemsize: int = 4,
    **extra,
) -> list[dict]:
    """Case dicts from ``measured[mode][impl]`` (anything with ``.median``, ``.iqr`` in s,
    e.g. a torch.utils.benchmark Measurement), "torch" among the implementations.

    Each case: device, shape, layout, dtype, impl, mode, median_s, iqr_s, repeats (when the
    measurement has ``times``), speedup_vs_torch (torch's median / this median), passes,
    bandwidth_GBps (passes * nbytes / median) and bandwidth_fraction (of ``limit_GBps``:
    copy bandwidth on a CPU, peak on a GPU; None without a limit), then ``extra``.
    """
    shape = [int(d) for d in shape]
    nbytes = math.prod(shape) * itemsize
    cases = []
    for mode, per_impl in measured.items():
        torch_median = float(per_impl["torch"].median)
        for impl, m in per_impl.items():
            median = float(m.median)
            bandwidth = PASSES[mode] * nbytes / median / 1e9
            cases.append(
                {
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
                    **extra,
                }
            )
    return cases


def format_goals(goals: list[dict]) -> str:
    """One line per goal: met / NOT met, and the measured value."""
    lines = []
    for g in goals:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"{'met    ' if g['met'] else 'NOT met'}  {g['what']}: {value}")
    return "\n".join(lines)
