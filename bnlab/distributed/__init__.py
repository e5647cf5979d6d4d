"""BatchNorm across processes: one batch split over ranks, normalized as if it were whole.

- ``sync``: :class:`~bnlab.distributed.sync.SyncBatchNorm`, a drop-in for
  ``torch.nn.SyncBatchNorm`` that runs on any ``torch.distributed`` backend (gloo on CPU
  included): Chan's merge of every rank's (count, mean, M2) forward, one all_reduce backward;
- ``launch``: :func:`~bnlab.distributed.launch.run`, which spawns a group of local processes
  (gloo on 127.0.0.1), collects each rank's return value and leaves no process behind;
- ``equality``: the proof that SyncBatchNorm over ranks equals BatchNorm over the
  concatenated batch, for every input rank, affine, momentum and dtype, with uneven splits
  and an empty rank, plus the small checks run inside a group (mismatched ranks, eval,
  torch's own SyncBatchNorm on CPU);
- ``ddp``: LeNet trained with DistributedDataParallel on gloo, per-replica BN vs
  SyncBatchNorm vs one process with the same global batch; the two timed side by side;
  SyncBatchNorm's bytes per layer and step (computed, and counted in a group); per-replica
  statistics; gradient accumulation over micro-batches and its mismatch with BN;
- ``ghost``: Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual sub-batches,
  what per-replica BN and accumulation do to a batch; :func:`convert_ghost_batchnorm`.

What a torch user reaches for is here too: ``from bnlab.distributed import SyncBatchNorm``
(as ``torch.nn.SyncBatchNorm``, with its ``convert_sync_batchnorm``), ``sync_batch_norm``,
the Ghost BN layers and their converter, and the launcher's ``run``.

Serves notebook 09.
"""

from bnlab.distributed.ghost import GhostBatchNorm1d, GhostBatchNorm2d, convert_ghost_batchnorm
from bnlab.distributed.launch import run
from bnlab.distributed.sync import SyncBatchNorm, sync_batch_norm

__all__ = [
    "SyncBatchNorm",
    "sync_batch_norm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "convert_ghost_batchnorm",
    "run",
]
