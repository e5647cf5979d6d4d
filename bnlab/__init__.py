"""bnlab: Batch Normalization from first principles to kernels.

The folders show the architecture (ARCHITECTURE.md maps them to the notebooks):

- ``nn``: BN itself: ``functional`` (the math and argument validation), ``modules``
  (drop-ins for torch.nn's BatchNorm), ``norms`` (Layer/Instance/GroupNorm), ``renorm``
  (Batch Renormalization), ``merge`` (Chan's merge of partial statistics), ``hooks`` (walking
  and hooking a model);
- ``kernels``: Numba CUDA and CPU kernels, their autograd Function and modules;
- ``experiments``: ``datafiles`` and ``data`` (Fashion-MNIST), ``models``, ``train`` (the
  training loop and accuracy), ``sweeps``, ``probes`` (activations measured in a run);
- ``inference``: ``fusion`` (folding BN), ``freeze``, ``recalibrate`` (precise BN);
- ``teaching``: ``check`` (the learner's checkers), ``widgets``, ``plots``, ``show``,
  ``doctor`` (a pitfall detector), ``notebooks`` (the committed notebooks' hygiene);
- ``distributed``: ``sync`` (SyncBatchNorm on any backend, CPU included), ``launch``
  (spawning a local process group), ``equality`` (SyncBatchNorm == BN on the whole batch);
- ``bench``: timing and ``python -m bnlab.bench``; ``config``: FAST mode, seeds, device.

Learners' import paths stay short: ``bnlab.functional``, ``bnlab.modules``, ``bnlab.norms``,
``bnlab.fusion``, ``bnlab.freeze``, ``bnlab.recalibrate``, ``bnlab.check``,
``bnlab.widgets``, ``bnlab.data``, ``bnlab.models`` and ``bnlab.train`` are the modules
above under a second name (``_alias``). Submodules are imported on demand, so that
``import bnlab`` stays light.
"""

__version__ = "0.1.0"
