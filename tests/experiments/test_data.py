"""bnlab.experiments.data: loaders over in-memory tensors."""

from __future__ import annotations

import pytest
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


def test_split_gives_disjoint_validation_and_training_subsets():
    x = torch.arange(100.0)[:, None]
    y = torch.arange(100) % 10
    (xv, yv), (xt, yt) = data.split(x, y, 20, 50, seed=3)
    assert len(xv) == 20 and len(xt) == 50
    assert not set(xv.flatten().tolist()) & set(xt.flatten().tolist())
    assert torch.equal(yv, xv.flatten().long() % 10)  # labels travel with their images
    (xv2, _), (rest, _) = data.split(x, y, 20, None, seed=3)
    assert torch.equal(xv2, xv) and len(rest) == 80  # n_train=None: all the rest
    assert set(xv.flatten().tolist()) | set(rest.flatten().tolist()) == set(range(100))
    for n_val, n_train in ((0, 10), (100, None), (50, 51)):
        with pytest.raises(ValueError, match="n_val"):
            data.split(x, y, n_val, n_train)


def test_fashion_mnist_validation_split_comes_from_the_training_images():
    d = data.fashion_mnist(n_train=3000, n_val=1000, n_test=500, fast=False)
    assert (len(d.train.x), len(d.val.x), len(d.test.x)) == (3000, 1000, 500)
    train_ids = {hash(img.numpy().tobytes()) for img in d.train.x}
    assert not any(hash(img.numpy().tobytes()) in train_ids for img in d.val.x)
    x_all, _ = data.load_tensors(train=True)
    pool = {hash(img.numpy().tobytes()) for img in x_all[:60000]}
    assert all(hash(img.numpy().tobytes()) in pool for img in d.val.x[:50])
    assert data.fashion_mnist(n_train=300, fast=False).val is None  # asked for, or none
