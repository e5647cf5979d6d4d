"""Speed, measured side by side in one run: ``python -m bnlab.bench`` (``make bench``).

- ``timing``: interleaved timing, medians, the profiler's operator shares (04, 07, 08);
- ``tables``: BN kernels vs torch, effective bandwidth vs copy / peak bandwidth (04);
- ``folding``: unfused vs folded inference (07).
"""
