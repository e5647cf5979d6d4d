"""Data in memory: Fashion-MNIST's tensors and loaders (05, 06, 08), a synthetic task (01).

The files themselves (where they are found, their checksums, the download, Debian's
package, the IDX format) are :mod:`bnlab.experiments.datafiles`; this module turns them
into tensors, fixed subsets and mini-batches. :class:`TensorLoader` is a DataLoader
without workers or copies, which is what small CPU experiments need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnlab.config import pick

# The file-level API, re-exported so that ``bnlab.data`` (the learners' path) offers both.
from bnlab.experiments.datafiles import (
    CLASSES,
    DataError,
    DownloadError,
    download,
    ensure,
    locate,
    read_idx,
    read_split,
    search_dirs,
    setup_data,
    verify,
    verify_file,
)

__all__ = [
    "CLASSES", "FAST_TEST", "FAST_TRAIN", "Data", "DataError", "DownloadError", "TensorLoader",
    "class_sorted", "download", "ensure", "fashion_mnist", "load_tensors", "locate",
    "prototype_images", "read_idx", "search_dirs", "setup_data", "split", "subset", "verify",
    "verify_file",
]  # fmt: skip

# FAST mode trains on a fixed random subset; sizes chosen so that LeNet learns in 1-2 epochs.
FAST_TRAIN = 6000
FAST_TEST = 2000


def load_tensors(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of one split: x (N, 1, 28, 28) float32 in [0, 1], y (N,) int64.

    N is 60000 for train, 10000 for test. Cached per process; do not modify in place.
    """
    return read_split(ensure(), bool(train))


class TensorLoader:
    """Mini-batches of in-memory tensors, like a DataLoader without workers or copies.

    x: (N, ...) inputs; y: (N,) labels. With ``shuffle`` each pass draws a new permutation
    from its own generator, seeded by ``seed`` (``reseed`` restarts the sequence).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length (got {len(x)} and {len(y)})")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the shuffling sequence from ``seed``."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield (
                    self.x[start : start + self.batch_size],
                    self.y[start : start + self.batch_size],
                )
            else:
                idx = order[start : start + self.batch_size]
                yield self.x[idx], self.y[idx]


@dataclass
class Data:
    """A train loader (shuffled), a test loader and, when asked for, a validation loader.

    ``val`` holds images drawn from Fashion-MNIST's 60 000 training images, disjoint from
    ``train``: the held-out set on which the course makes its choices (learning rates,
    initializations), so that ``test`` is read only to report a chosen model. None when
    no validation split was asked for.
    """

    train: TensorLoader
    test: TensorLoader
    classes: list[str]
    val: TensorLoader | None = None


def subset(
    x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` examples (all of them when n is None or >= N)."""
    if n is None or n >= len(x):
        return x, y
    if n < 1:
        raise ValueError(f"subset size n must be >= 1 (got {n})")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def split(
    x: torch.Tensor, y: torch.Tensor, n_val: int, n_train: int | None, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint validation and training subsets of (x, y): ((x_val, y_val), (x_train, y_train)).

    One random permutation (``seed``) of the N examples: the first ``n_val`` are the
    validation set, the next ``n_train`` the training set (all the rest when n_train is None).
    """
    if n_val < 1:
        raise ValueError(f"n_val must be >= 1 (got {n_val}); pass n_val=None for no validation set")
    rest = len(x) - n_val
    if rest < 1 or (n_train is not None and not 1 <= n_train <= rest):
        raise ValueError(
            f"n_val={n_val} and n_train={n_train} do not fit in {len(x)} training images: "
            f"n_val + n_train must be at most {len(x)}"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val : n_val + (rest if n_train is None else n_train)]
    return (x[val], y[val]), (x[train], y[train])


def fashion_mnist(
    batch_size: int = 256,
    n_train: int | None = None,
    n_test: int | None = None,
    fast: bool | None = None,
    seed: int = 0,
    n_val: int | None = None,
) -> Data:
    """Fashion-MNIST loaders from in-memory tensors.

    n_train, n_test: subset sizes; by default all 60000/10000 in full mode and
    FAST_TRAIN/FAST_TEST in FAST mode (``fast`` overrides the environment's choice).
    n_val: the size of a validation set drawn from the training images, disjoint from the
    training subset (with n_train None, the training subset is all the rest); ``Data.val``.
    Subsets are fixed random draws (``seed``), the same in every run.
    """
    use_fast = pick(True, False) if fast is None else fast
    if use_fast:
        n_train = FAST_TRAIN if n_train is None else n_train
        n_test = FAST_TEST if n_test is None else n_test
    x_all, y_all = load_tensors(train=True)
    val = None
    if n_val is None:
        x_train, y_train = subset(x_all, y_all, n_train, seed)
    else:
        (x_val, y_val), (x_train, y_train) = split(x_all, y_all, n_val, n_train, seed)
        # evaluation does not depend on the batch size in eval mode: large batches are faster
        val = TensorLoader(x_val, y_val, max(batch_size, 256), shuffle=False)
    x_test, y_test = subset(*load_tensors(train=False), n_test, seed)
    return Data(
        train=TensorLoader(x_train, y_train, batch_size, shuffle=True, seed=seed),
        test=TensorLoader(x_test, y_test, batch_size, shuffle=False),
        classes=CLASSES,
        val=val,
    )


def class_sorted(loader: TensorLoader, batch_size: int | None = None) -> TensorLoader:
    """The loader's examples sorted by label, unshuffled: most batches hold a single class."""
    order = torch.argsort(loader.y, stable=True)
    return TensorLoader(loader.x[order], loader.y[order], batch_size or loader.batch_size)


def prototype_images(n: int, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST-shaped task made with torch alone, for notebooks that need no files.

    Each class is a smooth random 28x28 prototype (7x7 noise, bilinearly upsampled); an
    example is half its prototype plus 0.25, seen through N(0, 0.5^2) pixel noise and
    clipped to [0, 1], so, like real pixels, the inputs are not centred. One generator
    seeded with ``seed`` draws prototypes, labels and noise: the same n examples every run.
    Returns x (n, 1, 28, 28) float32 and y (n,) int64.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.nn.functional.interpolate(
        torch.rand(classes, 1, 7, 7, generator=g), size=28, mode="bilinear"
    )
    y = torch.randint(0, classes, (n,), generator=g)
    x = (0.5 * prototypes[y] + 0.25 + 0.5 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y
