"""BatchNorm itself: the math, the modules, the hooks that look inside a model.

- ``reference``: the teaching BatchNorm, forward and backward written as the math and the
  running statistics, no validation, one screen (03 builds and shows it first);
- ``functional``: forward, backward and running statistics as tensor math, argument
  validation (notebooks 02, 03);
- ``modules``: BatchNorm1d/2d/3d, drop-ins for torch.nn's (03);
- ``norms``: LayerNorm, InstanceNorm, GroupNorm as BN over other axes (08);
- ``renorm``: BatchRenorm1d/2d, Batch Renormalization (Ioffe, 2017): BN corrected towards
  its running statistics while training (06);
- ``merge``: Chan's merge of partial (count, mean, M2) statistics, the one definition the
  kernels, precise BN and a distributed BN share (04, 06);
- ``hooks``: walking a model's layers and hooking their forward calls (01, 06, 07, 08).
"""
