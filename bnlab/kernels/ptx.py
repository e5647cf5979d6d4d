"""Compile every CUDA kernel to PTX without a GPU, and inspect the result.

``cuda.compile_ptx`` needs the real ``numba.cuda`` target (NVVM), never the simulator,
and a process picks one of the two when it first imports ``numba.cuda``. So run this in
a fresh process: ``NUMBA_ENABLE_CUDASIM=0 python -m bnlab.kernels.ptx`` prints, for each
kernel and dtype, the PTX size and the float64 instructions found in it (a float32
kernel must have none: one stray ``1.0`` literal, or eps passed as a Python float, would
promote its arithmetic to f64; the costly ones, sqrt, div and rcp in f64, are counted
apart), the warp shuffles (``shfl.sync``), the barriers (``bar.sync``) and the 64-bit
integer divisions and remainders (``div.s64``/``rem.s64``, slow on a GPU). Each kernel is
compiled for the one signature :func:`bnlab.kernels.cuda.signatures` gives it, the same
one the launch wrappers compile and run.

Serves notebook 04 (and `make test`).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import numpy as np

_F64 = re.compile(r"^\s*[a-z][\w.]*\.f64\b", re.MULTILINE)
_F64_COSTLY = re.compile(r"^\s*(sqrt|div|rcp|rsqrt)\.[\w.]*f64\b")
_INT64_DIV = re.compile(r"^\s*(div|rem)\.[su]64\b")


def f64_instructions(ptx: str) -> list[str]:
    """The PTX instructions that operate on float64 (any opcode with a ``.f64`` part)."""
    return [line.strip() for line in ptx.splitlines() if ".f64" in line and _F64.match(line)]


def f64_sqrt_div(ptx: str) -> list[str]:
    """The float64 square roots, divisions and reciprocals: the slow ones on a GPU."""
    return [line.strip() for line in ptx.splitlines() if _F64_COSTLY.match(line)]


def int64_divisions(ptx: str) -> list[str]:
    """64-bit integer divisions and remainders (about a hundred instructions each on a GPU)."""
    return [line.strip() for line in ptx.splitlines() if _INT64_DIV.match(line)]


def count(ptx: str, opcode: str) -> int:
    """How many instructions start with ``opcode`` (e.g. "shfl.sync", "bar.sync")."""
    return sum(1 for line in ptx.splitlines() if line.strip().startswith(opcode))


@contextmanager
def _no_gpu_needed(cc: tuple[int, int]):
    # numba-cuda compiles a called device function for "the current device", which
    # asks the CUDA driver; without a GPU, stand in a device of the target capability.
    fake = SimpleNamespace(compute_capability=cc)
    with mock.patch("numba.cuda.dispatcher.get_current_device", return_value=fake):
        yield


def compile_all(cc: tuple[int, int] = (9, 0)) -> dict[tuple[str, str], str]:
    """PTX for every kernel in :mod:`bnlab.kernels.cuda`, float32 and float64, for ``cc``."""
    from bnlab.kernels.backend import cuda_module

    cuda = cuda_module(simulator=False)
    from bnlab.kernels import cuda as kernels

    out = {}
    with _no_gpu_needed(cc):
        for np_dtype in (np.float32, np.float64):
            sources, sigs = kernels.sources(np_dtype, block=256), kernels.signatures(np_dtype)
            for name, fn in sources.items():
                ptx, _ = cuda.compile_ptx(fn, sigs[name], cc=cc)
                out[(name, np.dtype(np_dtype).name)] = ptx
    return out


def compile_python_float_eps(cc: tuple[int, int] = (9, 0)) -> str:
    """The control: float32 ``channel_stats`` compiled with eps and momentum as float64, the
    specialization a Python float argument would make. Its sqrt and divide run in f64."""
    from numba import types

    from bnlab.kernels.backend import cuda_module

    cuda = cuda_module(simulator=False)
    from bnlab.kernels import cuda as kernels

    sig = list(kernels.signatures(np.float32)["channel_stats"])
    sig[4] = sig[5] = types.float64  # eps, momentum
    with _no_gpu_needed(cc):
        fn = kernels.sources(np.float32, block=256)["channel_stats"]
        return cuda.compile_ptx(fn, tuple(sig), cc=cc)[0]


def _row(kernel: str, dtype: str, p: str, control: bool) -> dict:
    return {
        "kernel": kernel,
        "dtype": dtype,
        "control": control,
        "chars": len(p),
        "entry": ".entry" in p,
        "f64": f64_instructions(p),
        "f64_sqrt_div": f64_sqrt_div(p),
        "int64_div": int64_divisions(p),
        "shfl": count(p, "shfl.sync"),
        "bar": count(p, "bar.sync") + count(p, "barrier.sync"),
    }


def main() -> None:
    """One JSON line: a row per (kernel, dtype), then the control row ("control": true)."""
    report = [_row(k, d, p, control=False) for (k, d), p in compile_all().items()]
    # its dtype names the float64 scalars, so that a reader filtering on "float32" skips it
    control = compile_python_float_eps()
    report.append(_row("channel_stats", "float32, eps f64", control, control=True))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
