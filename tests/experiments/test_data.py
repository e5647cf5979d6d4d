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
