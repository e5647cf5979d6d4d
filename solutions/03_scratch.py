"""Reference solutions for notebook 03 (BN from scratch). Try the exercises yourself first.

The checkers are ``bnlab.check``'s: ``check_forward``, ``check_backward`` and
``check_running_stats``. Run ``python solutions/03_scratch.py`` to put every solution
through its checker.
"""

import torch


def bn_forward(x, gamma, beta, eps):
    """Training-mode forward of (N, C, H, W) or (N, C) input: returns (out, cache)."""
    dims = (0,) + tuple(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    xhat = (x - mean) / std
    out = gamma.view(shape) * xhat + beta.view(shape)
    return out, (xhat, gamma.view(shape), std, dims)


def bn_backward(dout, cache):
    """(dx, dgamma, dbeta) from the cache of :func:`bn_forward`."""
    xhat, g, std, dims = cache
    dgamma = (dout * xhat).sum(dim=dims)
    dbeta = dout.sum(dim=dims)
    mean_dout = dout.mean(dim=dims, keepdim=True)
    mean_dout_xhat = (dout * xhat).mean(dim=dims, keepdim=True)
    dx = g / std * (dout - mean_dout - xhat * mean_dout_xhat)
    return dx, dgamma, dbeta


def running_stats_step(x, running_mean, running_var, momentum):
    """One training batch's update of the (C,) running buffers, in place, as PyTorch does:
    momentum weighs the new value, and the running variance is the unbiased one."""
    dims = (0,) + tuple(range(2, x.dim()))
    m = x.numel() // x.shape[1]
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False) * m / (m - 1)
    running_mean.mul_(1 - momentum).add_(momentum * mean)
    running_var.mul_(1 - momentum).add_(momentum * var)


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "03_scratch").items():
        print(f"{name}: {result}")
