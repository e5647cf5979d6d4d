"""Hand-written Batch Normalization kernels, checked against ``bnlab.nn.functional``.

Submodules, imported on demand (importing ``cuda`` decides GPU vs simulator):

- ``backend``: choose the real CUDA target or Numba's simulator before numba.cuda loads;
- ``cuda``: numba.cuda kernels (Welford + Chan statistics, split variant, normalize,
  backward reduce/elementwise, running statistics) and launch wrappers on torch tensors;
- ``cpu``: the same algorithm on the CPU, channel-blocked, one ``numba.njit`` entry per phase;
- ``autograd``: a ``torch.autograd.Function``, a functional ``batch_norm`` and
  BatchNorm1d/2d modules running on either kernel set (``backend="cpu"`` or ``"cuda"``);
- ``ops``: the kernels as registered torch operators (``bnlab::batch_norm_train``, ...)
  with their gradient and fake implementations, which ``torch.compile`` keeps whole;
- ``machine``: the CPU's L2 and last-level cache sizes from sysfs (the CPU kernels' group size);
- ``validate``: argument validation shared by both; ``stability``: the cancellation demo;
- ``ptx``: compile every CUDA kernel to PTX without a GPU (run in its own process).
"""

from bnlab.kernels.backend import spell_for_numba

spell_for_numba()  # before a kernel module imports numba: numba reads the variable with int()
