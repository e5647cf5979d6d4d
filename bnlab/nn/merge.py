"""Chan's merge of partial statistics: the one definition bnlab's reductions share.

A summary of some values is the triple (count, mean, M2), with M2 the sum of squared
deviations from the mean. Two summaries combine exactly, in any order and without the
cancellation of E[x^2] - E[x]^2 (Chan, Golub & LeVeque, "Updating formulae and a pairwise
algorithm for computing sample variances", 1979):

    n = na + nb,   delta = mb - ma,   mean = ma + delta * nb / n,
    M2 = M2a + M2b + delta^2 * na * nb / n.

:func:`merge_moments` is plain Python arithmetic, so the same function serves every place
that merges: compiled with ``numba.njit`` by the CPU kernels (which accumulate in float64
on purpose), with ``cuda.jit(device=True)`` by the CUDA kernels (typed by its inputs, so a
float32 kernel stays float32), and called on tensors by precise BN
(:mod:`bnlab.inference.recalibrate`) and by a merge across processes. Notebooks 04 and 06.
"""

from __future__ import annotations


def merge_moments(na, ma, qa, nb, mb, qb):
    """Merge the summaries (na, ma, qa) and (nb, mb, qb) of two sets of values.

    Counts, means and M2s may be Python or NumPy scalars, or tensors of per-channel
    means and M2s with scalar counts. Returns (count, mean, M2) of the union; an empty
    second summary (nb == 0) returns the first unchanged, so empty parts never divide 0/0.
    """
    if nb == nb - nb:  # nb - nb: a zero of nb's own type, so float32 code stays float32
        return na, ma, qa
    n = na + nb
    delta = mb - ma
    wb = nb / n
    return n, ma + delta * wb, qa + qb + delta * delta * na * wb
