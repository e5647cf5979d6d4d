"""Reference solutions for notebook 05 (LeNet with BN). Try the exercises yourself first.

Run ``python solutions/05_lenet.py`` to put every solution through its checker.
"""

import math

import torch
from scipy import stats
from torch import nn


def t_interval(values, confidence=0.95):
    """(mean, half_width) of the t confidence interval of the mean of a few runs."""
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    std = values.std(unbiased=True)  # the sample's standard deviation, ddof = 1
    t = stats.t.ppf(0.5 + confidence / 2, n - 1)  # Student's t quantile, n - 1 degrees of freedom
    return values.mean().item(), t * std.item() / math.sqrt(n)


def lenet_with_bn():
    """LeNet-5 for (N, 1, 28, 28) input with a BN after every conv and hidden linear layer,
    before the activation (after it passes too); none on the logits."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.BatchNorm2d(6),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.BatchNorm2d(16),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.BatchNorm1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.BatchNorm1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "05_lenet").items():
        print(f"{name}: {result}")
