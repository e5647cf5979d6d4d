"""Backend choice for the CUDA kernels: a real GPU, or Numba's CUDA simulator.

``numba.cuda`` decides once, when it is first imported, whether it is the real CUDA
target or the simulator: it reads ``NUMBA_ENABLE_CUDASIM`` at that moment. So the
choice has to be made *before* that import, which is what :func:`cuda_module` does:

- ``NUMBA_ENABLE_CUDASIM`` set explicitly: respected as given (any integer, as numba reads
  it, or true/false, yes/no, on/off, written back as 1 or 0 before numba reads it);
- otherwise a GPU visible to torch means the real target, and no GPU means the
  simulator, announced with a one-line notice on stderr (in a notebook, in the cell).

The simulator runs each CUDA thread as a Python thread (milliseconds each; notebook 04
measures it) and has no warp shuffles: it is for correctness on tiny shapes, never for speed.

Serves notebook 04.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_ENV = "NUMBA_ENABLE_CUDASIM"


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU (the kernels then run natively on torch tensors)."""
    import torch  # here, so that importing bnlab.kernels (which imports this module) stays light

    return torch.cuda.is_available()


def _require_numba_cuda() -> None:
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError(
            "the CUDA kernels need NVIDIA's numba-cuda package, which is not installed; "
            'install it with `pip install "numba-cuda[cu13]"` (or `pip install -e ".[gpu]"`)'
        )


_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def simulator_flag(value: str | None) -> bool | None:
    """``NUMBA_ENABLE_CUDASIM``'s value as a choice: True (the simulator), False (the real
    target), None (unset or empty: decide from whether there is a GPU).

    numba reads the variable with ``int()``, so any integer counts as it does (nonzero: the
    simulator); the words true/false, yes/no and on/off are read as 1 and 0. Anything else
    raises ValueError: numba would ignore it with a warning and pick the real target.
    """
    if value is None or not value.strip():
        return None
    try:
        return int(value) != 0
    except ValueError:
        pass
    if value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError(
        f"{_ENV}={value!r} is neither a number nor true/false: set it to 1 for Numba's CUDA "
        "simulator or 0 for the GPU, or unset it to let bnlab choose (the simulator without a GPU)"
    )


def spell_for_numba() -> None:
    """Write a word bnlab accepts in ``NUMBA_ENABLE_CUDASIM`` (true, off, ...) back as 1 or 0.

    Run when ``bnlab.kernels`` is imported, before any kernel module imports numba, which reads
    the variable with ``int()`` and warns about a word. Other values are left for
    :func:`cuda_module` to judge, so a CPU kernel user is never stopped by a CUDA setting.
    """
    value = os.environ.get(_ENV, "").strip().lower()
    if value in _WORDS:
        os.environ[_ENV] = "1" if _WORDS[value] else "0"


def announce_simulator() -> None:
    """Say once that the kernels run on the simulator, on stderr so that a script's output
    stays clean; in a Jupyter kernel on stdout, shown in the cell (a notebook stores stderr)."""
    in_kernel = type(sys.stderr).__module__.startswith("ipykernel")
    print(
        f"bnlab.kernels: no CUDA GPU found, running on Numba's CUDA simulator ({_ENV}=1)",
        file=sys.stdout if in_kernel else sys.stderr,
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
        simulator = simulator_flag(os.environ.get(_ENV))
        if simulator is None:
            simulator = not gpu_available()
            if simulator:
                announce_simulator()
    os.environ[_ENV] = "1" if simulator else "0"  # numba reads this when it is imported
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
