"""bnlab: Batch Normalization from first principles to kernels.

Modules, one idea each: ``config`` (FAST mode, seeds, device), ``functional`` (the
math), ``modules`` (BatchNorm1d/2d/3d drop-ins), ``models``, ``show`` (notebook source
display). Submodules are imported on demand so that ``import bnlab`` stays light.
"""

__version__ = "0.1.0"
