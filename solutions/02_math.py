"""Reference solutions for notebook 02 (the math). Try the exercises yourself first.

Run ``python solutions/02_math.py`` to put every solution through its checker.
"""

import torch


def bn_backward_dx(dout, x, gamma, eps):
    """Input gradient of training-mode BN: dx = gamma / std * (dout - mean(dout)
    - xhat * mean(dout * xhat)), the means over every axis but the channel axis."""
    dims = (0,) + tuple(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    std = torch.sqrt(x.var(dim=dims, keepdim=True, unbiased=False) + eps)
    xhat = (x - mean) / std
    mean_dout = dout.mean(dim=dims, keepdim=True)
    mean_dout_xhat = (dout * xhat).mean(dim=dims, keepdim=True)
    return gamma.view(shape) / std * (dout - mean_dout - xhat * mean_dout_xhat)


def identity_params(x, eps):
    """(gamma, beta) per channel that make training-mode BN of x return x itself:
    gamma = sqrt(var + eps) undoes the division, beta = mean adds the mean back."""
    dims = (0,) + tuple(range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return torch.sqrt(var + eps), mean


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "02_math").items():
        print(f"{name}: {result}")
