"""Compile every CUDA kernel to PTX without a GPU, and inspect the result.

``cuda.compile_ptx`` needs the real ``numba.cuda`` target (NVVM), never the simulator,
and a process picks one of the two when it first imports ``numba.cuda``. So run this in
a fresh process: ``NUMBA_ENABLE_CUDASIM=0 python -m bnlab.kernels.ptx`` prints, for each
kernel and dtype, the PTX size and the float64 instructions found in it (a float32
kernel must have none: one stray ``1.0`` literal would promote its arithmetic to f64).

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


def f64_instructions(ptx: str) -> list[str]:
    """The PTX instructions that operate on float64 (any opcode with a ``.f64`` part)."""
    return [line.strip() for line in ptx.splitlines() if ".f64" in line and _F64.match(line)]


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


def main() -> None:
    report = [
        {
            "kernel": k,
            "dtype": d,
            "chars": len(p),
            "entry": ".entry" in p,
            "f64": f64_instructions(p),
        }
        for (k, d), p in compile_all().items()
    ]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
