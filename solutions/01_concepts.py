"""Reference solutions for notebook 01 (concepts). Try the exercises yourself first.

Run ``python solutions/01_concepts.py`` to put every solution through its checker.
"""

import torch


def batch_stats(x):
    """Per-channel mean and biased variance of (N, C) or (N, C, H, W) input: two (C,) tensors."""
    dims = (0,) + tuple(range(2, x.dim()))  # every axis but the channel axis
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return mean, var


def bn_eval(x, running_mean, running_var, gamma, beta, eps):
    """Eval-mode BN of (N, C, H, W) input: the running statistics, not the batch's."""

    def view(v):
        return v.view(1, -1, 1, 1)

    xhat = (x - view(running_mean)) / torch.sqrt(view(running_var) + eps)
    return view(gamma) * xhat + view(beta)


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "01_concepts").items():
        print(f"{name}: {result}")
