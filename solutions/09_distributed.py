"""Reference solutions for notebook 09 (BN across devices). Try the exercises yourself first.

Run ``python solutions/09_distributed.py`` to put every solution through its checker.
"""

import torch


def merge_replica_stats(stats):
    """The global batch's per-channel (mean, biased var) from each replica's (count, mean, var).

    Each replica's var is biased (around its own mean), so its sum of squared deviations is
    count * var; the global one adds each replica's count * (mean_r - mean)^2.
    """
    counts = torch.tensor([float(n) for n, _, _ in stats], dtype=torch.float64).reshape(-1, 1)
    means = torch.stack([torch.as_tensor(m, dtype=torch.float64) for _, m, _ in stats])
    variances = torch.stack([torch.as_tensor(v, dtype=torch.float64) for _, _, v in stats])
    total = counts.sum()
    mean = (counts * means).sum(0) / total  # weighted by the counts
    m2 = (counts * variances).sum(0) + (counts * (means - mean) ** 2).sum(0)  # within + between
    return mean, m2 / total  # biased: what BN normalizes with


def ghost_bn(x, virtual_batch_size, eps=1e-5):
    """Ghost BN's training forward without gamma and beta: each contiguous chunk of
    ``virtual_batch_size`` examples (the last may be smaller) normalized with its own
    per-channel mean and biased variance."""
    outs = []
    for chunk in x.split(virtual_batch_size):
        dims = [0] + list(range(2, x.dim()))
        mean = chunk.mean(dim=dims, keepdim=True)
        var = chunk.var(dim=dims, keepdim=True, unbiased=False)
        outs.append((chunk - mean) / torch.sqrt(var + eps))
    return torch.cat(outs)


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "09_distributed").items():
        print(f"{name}: {result}")
