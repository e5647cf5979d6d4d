"""The reference BatchNorm: the math of notebooks 02 and 03 on one screen, nothing else.

No argument checks, empty batches or momentum=None: those are bnlab.nn.modules'. Tested equal
to it and to torch.nn in tests/nn/test_reference.py. Serves notebook 03.
"""

import torch


def bn_forward(x, gamma, beta, eps):
    """Training-mode BN of x (N, C, *), per channel over every other axis: (y, cache)."""
    dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    mu, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)  # biased
    xhat = (x - mu) / (var + eps).sqrt()
    return gamma.view(shape) * xhat + beta.view(shape), (xhat, gamma.view(shape), var + eps, dims)


def bn_backward(dy, cache):
    """(dx, dgamma, dbeta) by notebook 02's compact formula; bar() is a channel's mean."""
    xhat, gamma, var_eps, dims = cache
    bar = lambda t: t.mean(dims, keepdim=True)
    dx = gamma / var_eps.sqrt() * (dy - bar(dy) - xhat * bar(dy * xhat))
    return dx, (dy * xhat).sum(dims), dy.sum(dims)


def update_running(x, running_mean, running_var, momentum):
    """PyTorch's rule, in place: momentum weighs the new batch; the variance is unbiased."""
    dims = [0, *range(2, x.dim())]
    running_mean.mul_(1 - momentum).add_(momentum * x.mean(dims))
    running_var.mul_(1 - momentum).add_(momentum * x.var(dims, unbiased=True))


class BNFunction(torch.autograd.Function):
    """Training mode, with bn_backward in place of autograd's backward."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        y, ctx.cache = bn_forward(x, gamma, beta, eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *bn_backward(dy, ctx.cache), None


class BatchNorm(torch.nn.Module):
    """BatchNorm1d/2d/3d in one, with torch's names for the parameters and buffers."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        if self.training:  # the batch's statistics; the running ones follow them
            self.num_batches_tracked += 1
            update_running(x.detach(), self.running_mean, self.running_var, self.momentum)
            return BNFunction.apply(x, self.weight, self.bias, self.eps)
        c = lambda v: v.view(1, -1, *[1] * (x.dim() - 2))  # eval: the running statistics
        xhat = (x - c(self.running_mean)) / (c(self.running_var) + self.eps).sqrt()
        return c(self.weight) * xhat + c(self.bias)
