"""Reference solutions for notebook 04 (Numba kernels). Try the exercises yourself first.

Run ``python solutions/04_numba_kernels.py`` to put every solution through its checker.
"""

import math


def merge(a, b):
    """Chan's merge of two (count, mean, M2) summaries into the summary of their union."""
    na, ma, qa = a
    nb, mb, qb = b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / n
    m2 = qa + qb + delta * delta * na * nb / n
    return n, mean, m2


def welford_update(state, x):
    """One Welford step: (count, mean, M2) after one more value x."""
    n, mean, m2 = state
    n += 1
    delta = x - mean
    mean += delta / n
    m2 += delta * (x - mean)  # the old mean's deviation times the new mean's
    return n, mean, m2


def train_forward_bytes(shape, itemsize):
    """Minimum memory traffic of a training forward with no cache reuse (every pass over x
    streams from memory): read x for the statistics, read it again to normalize, write y:
    3 passes."""
    return 3 * math.prod(shape) * itemsize


if __name__ == "__main__":
    from bnlab.teaching import exercises

    for name, result in exercises.check_all(globals(), "04_numba_kernels").items():
        print(f"{name}: {result}")
