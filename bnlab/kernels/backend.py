"""Backend choice for the CUDA kernels: a real GPU, or Numba's CUDA simulator.

``numba.cuda`` decides once, when it is first imported, whether it is the real CUDA
target or the simulator: it reads ``NUMBA_ENABLE_CUDASIM`` at that moment. So the
choice has to be made *before* that import, which is what :func:`cuda_module` does:

- ``NUMBA_ENABLE_CUDASIM`` set explicitly (``0`` or ``1``): respected as given;
- otherwise a GPU visible to torch means the real target, and no GPU means the
  simulator, announced with a one-line notice.

The simulator runs each CUDA thread as a Python thread (about a millisecond each) and
has no warp shuffles: it is for correctness on tiny shapes, never for speed.

Serves notebook 04.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_ENV = "NUMBA_ENABLE_CUDASIM"


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU (the kernels then run natively on torch tensors)."""
    return torch.cuda.is_available()


def _require_numba_cuda() -> None:
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError(
            "the CUDA kernels need NVIDIA's numba-cuda package, which is not installed; "
            'install it with `pip install "numba-cuda[cu13]"` (or `pip install -e ".[gpu]"`)'
        )


def cuda_module(simulator: bool | None = None):
    """Import and return ``numba.cuda``, choosing the real target or the simulator first.

    ``simulator``: True forces the simulator, False the real target (e.g. to compile PTX
    without a GPU), None decides from ``NUMBA_ENABLE_CUDASIM`` or the presence of a GPU.
    Raises ImportError without numba-cuda, and RuntimeError when the simulator is
    requested after ``numba.cuda`` was already imported for the real target (or the
    other way round), since that choice cannot change inside a running process.
    """
    _require_numba_cuda()
    if "numba.cuda" in sys.modules:
        from numba import cuda

        if simulator is not None and simulator != is_simulator(cuda):
            have = "the simulator" if is_simulator(cuda) else "the real CUDA target"
            raise RuntimeError(
                f"numba.cuda was already imported as {have}, and that cannot change in a "
                f"running process; set {_ENV}={int(simulator)} before anything imports "
                "numba.cuda (restart the Jupyter kernel, or set it in the shell)"
            )
        if simulator is None and not is_simulator(cuda) and not gpu_available():
            if os.environ.get(_ENV) is None:
                raise RuntimeError(
                    "numba.cuda was imported for the real CUDA target but there is no GPU, "
                    f"and the simulator was requested too late: set {_ENV}=1 before "
                    "anything imports numba.cuda (restart the Jupyter kernel)"
                )
        return cuda
    if simulator is None:
        flag = os.environ.get(_ENV)
        simulator = bool(int(flag)) if flag not in (None, "") else not gpu_available()
        if flag in (None, "") and simulator:
            print(f"bnlab.kernels: no CUDA GPU found, running on Numba's CUDA simulator ({_ENV}=1)")
    os.environ[_ENV] = "1" if simulator else "0"
    if "numba.core.config" in sys.modules:  # numba read its environment when imported
        from numba.core import config

        config.reload_config()
    from numba import cuda

    return cuda


def is_simulator(cuda=None) -> bool:
    """Whether ``numba.cuda`` (``cuda``, or the one :func:`cuda_module` gives) is the simulator."""
    if cuda is None:
        cuda = cuda_module()
    # The simulator's API lives in numba.cuda.simulator; the real one does not.
    return cuda.jit.__module__.startswith("numba.cuda.simulator")
