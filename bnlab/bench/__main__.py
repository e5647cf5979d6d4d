"""``python -m bnlab.bench``: the benchmark tables of ``make bench``."""

from bnlab.bench.tables import main

main()
