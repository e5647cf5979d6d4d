"""Speed and memory, measured side by side in one run: ``python -m bnlab.bench`` (``make bench``).

- ``timing``: torch.utils.benchmark timings, interleaved; medians; profiler shares (04, 07, 08);
- ``cases``: the case schema and byte counts both benchmarks write (04);
- ``cpu``: BN kernels vs torch on the CPU: cases, byte counts, bandwidth, goals (04);
- ``memory``: peak extra memory per implementation, a fresh process each (04);
- ``folding``: BN folding in context: eager, folded, torch's fusers, torch.compile (07);
- ``gpu``: ``make bench-gpu``, the CUDA kernels vs torch/cuDNN and peak bandwidth (04);
- ``tables``: ``make bench``'s driver: prints, writes JSON, records the store (04, 07).
"""
