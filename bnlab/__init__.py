"""bnlab: Batch Normalization from first principles to kernels.

Modules, one idea each (the notebook each one serves in brackets):

- BN itself: ``functional`` (forward, backward, running statistics, argument checks; 02, 03),
  ``modules`` (BatchNorm1d/2d/3d drop-ins for torch.nn; 03), ``norms`` (LayerNorm,
  InstanceNorm, GroupNorm as BN over other axes; 08), ``kernels`` (Numba CUDA and CPU
  kernels, their autograd Function and modules; 04).
- Experiments: ``data`` (Fashion-MNIST, offline first; 05), ``models`` (LeNet, MLPs; 01, 05),
  ``train`` (``fit``/``evaluate``; 05), ``sweeps`` (seeds, learning rates, init scales; 05, 08),
  ``claims`` (the claim experiments; 08), ``bench`` (``make bench``; 04, 07).
- Inference and pitfalls: ``fusion`` (folding BN; 07), ``freeze`` and ``recalibrate``
  (frozen BN, precise-BN statistics; 06), ``doctor`` (a train/eval pitfall detector; 06).
- Teaching tools: ``check`` (checkers for the learner's code; 03), ``widgets`` (the eps /
  momentum dashboard; 03), ``plots``, ``show`` (a function's real source in a notebook),
  ``config`` (FAST mode, seeds, device), ``notebooks`` (the committed notebooks' metadata,
  trust and clean outputs; ``make test``).

Submodules are imported on demand so that ``import bnlab`` stays light.
"""

__version__ = "0.1.0"
