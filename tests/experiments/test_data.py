"""bnlab.experiments.data: loaders over in-memory tensors."""

from __future__ import annotations

import torch

from bnlab.experiments import data
from bnlab.experiments.data import TensorLoader


def test_class_sorted_groups_labels():
    y = torch.tensor([2, 0, 1, 0, 2, 1])
    loader = data.class_sorted(TensorLoader(torch.arange(6.0)[:, None], y, 2, shuffle=True))
    assert [b.tolist() for _, b in loader] == [[0, 0], [1, 1], [2, 2]]
    assert [x.flatten().tolist() for x, _ in loader][0] == [1.0, 3.0]


def test_prototype_images_are_reproducible_uncentred_pixels():
    x, y = data.prototype_images(500, seed=2)
    x2, y2 = data.prototype_images(500, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and 0.3 < x.mean() < 0.7
    assert set(y.tolist()) == set(range(10))
    assert not torch.equal(data.prototype_images(500, seed=3)[0], x)
