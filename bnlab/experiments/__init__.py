"""Training experiments: data, models, the training loop, sweeps and probes.

- ``datafiles``: Fashion-MNIST's files, offline first; ``python -m bnlab.data`` (05, 06, 08);
- ``data``: the files as tensors, fixed subsets and mini-batch loaders (01, 05, 06, 08);
- ``models``: LeNet, MLPs, a small CNN, a small ResNet, noise layers after BN, BN swapped
  for GroupNorm or Batch Renorm, initializations (01, 05, 06, 08);
- ``train``: the one training step/epoch loop, ``fit``, accuracy and evaluation (all);
- ``sweeps``: seeds, learning rates, initialization scales, and ``compare``, the one way
  two arms are compared (the interval of their difference) (05, 06, 08, 09);
- ``batch_size``: the equal-steps protocol across batch sizes (06, 08);
- ``probes``: measuring inside a training run: covariate shift, moments,
  variance shift (01, 06, 08).
"""
