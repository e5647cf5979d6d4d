"""Reference solutions for notebook 05 (LeNet with BN). Try the exercises yourself first.

Run ``python solutions/05_lenet.py`` to put every solution through its checker.
"""

import math

import torch
from torch import nn


def t_quantile(p, df):
    """Student's t quantile with torch only: the CDF integrated on a fine grid, inverted.

    (With SciPy installed this is ``scipy.stats.t.ppf(p, df)``.)
    """
    if p < 0.5:
        return -t_quantile(1 - p, df)
    dist = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64))
    grid = torch.linspace(0.0, 200.0, 800_001, dtype=torch.float64)
    pdf = dist.log_prob(grid).exp()
    steps = (pdf[1:] + pdf[:-1]) / 2 * (grid[1] - grid[0])  # trapezoids
    cdf = torch.cat([torch.tensor([0.5], dtype=torch.float64), 0.5 + steps.cumsum(0)])
    i = int(torch.searchsorted(cdf, torch.tensor([p], dtype=torch.float64)))
    frac = (p - cdf[i - 1]) / (cdf[i] - cdf[i - 1])  # linear between the grid points
    return float(grid[i - 1] + frac * (grid[i] - grid[i - 1]))


def t_interval(values, confidence=0.95):
    """(mean, half_width) of the t confidence interval of the mean of a few runs."""
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    std = values.std(unbiased=True)  # the sample's standard deviation, ddof = 1
    t = t_quantile(0.5 + confidence / 2, n - 1)
    return values.mean().item(), t * std.item() / math.sqrt(n)


def lenet_with_bn():
    """LeNet-5 for (N, 1, 28, 28) input with a BN after every conv and hidden linear layer,
    before the activation; none on the logits."""
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
