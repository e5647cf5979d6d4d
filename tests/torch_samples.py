"""PyTorch's own sample inputs for its norm modules (torch.testing's module_db), as pairs.

``module_db`` ships with torch (``torch/testing/_internal/common_modules.py``; importing it
needs ``expecttest``). Each sample is a constructor call and a forward input that torch's
test suite runs; :func:`samples` yields them for the named module, both modes.
"""

from __future__ import annotations

import torch


def samples(name: str, dtype: torch.dtype = torch.float64):
    """(id, constructor args, kwargs, forward args, training) for module_db's ``nn.<name>``."""
    from bnlab.kernels.backend import cuda_module

    # torch's test utilities import numba.cuda when it is installed: let bnlab choose the
    # target (the simulator without a GPU) first, or the kernel tests could not run after.
    cuda_module()
    from torch.testing._internal.common_modules import module_db

    info = next(m for m in module_db if m.name == f"nn.{name}")
    for training in (True, False):
        inputs = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
        for i, s in enumerate(inputs):
            if s.forward_input is None:
                continue
            desc = getattr(s, "desc", "") or f"sample{i}"
            yield (
                f"{name}-{'train' if training else 'eval'}-{desc}",
                s.constructor_input.args,
                s.constructor_input.kwargs,
                s.forward_input.args,
                training,
            )


def run_side_by_side(ours: torch.nn.Module, ref: torch.nn.Module, fargs, training: bool) -> dict:
    """Forward and backward both modules on copies of ``fargs``; the largest differences.

    ``ours`` gets ``ref``'s state first. Returns {"output", "input grad", "state"}: max
    |difference| of outputs, input gradients (one upstream gradient for both) and every
    floating state entry, plus "counter" (num_batches_tracked equal, or no counter).
    """
    ours.train(training).load_state_dict(ref.state_dict())
    ref.train(training)
    xs = [a.detach().clone().requires_grad_() for a in fargs]
    xr = [a.detach().clone().requires_grad_() for a in fargs]
    yo, yr = ours(*xs), ref(*xr)
    grad = torch.randn_like(yr)
    yo.backward(grad)
    yr.backward(grad)

    def gap(a, b):
        return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0

    so, sr = ours.state_dict(), ref.state_dict()
    return {
        "output": gap(yo, yr),
        "input grad": max([gap(a.grad, b.grad) for a, b in zip(xs, xr, strict=True)] or [0.0]),
        "state": max([gap(so[k], v) for k, v in sr.items() if v.is_floating_point()] or [0.0]),
        "counter": all(torch.equal(so[k], v) for k, v in sr.items() if not v.is_floating_point()),
    }


def assert_sample_matches_torch(make_ours, sid: str, args, kwargs, fargs, training: bool) -> None:
    """Build bnlab's module with ``make_ours(name)(*args, **kwargs)`` and torch's ``nn.<name>``
    from one :func:`samples` entry; assert equal outputs, input gradients and state (1e-10)."""
    name = sid.split("-")[0]
    ours = make_ours(name)(*args, **kwargs).double()
    ref = getattr(torch.nn, name)(*args, **kwargs).double()
    diffs = run_side_by_side(ours, ref, fargs, training)
    assert diffs["counter"], diffs
    assert max(diffs["output"], diffs["input grad"], diffs["state"]) < 1e-10, diffs
