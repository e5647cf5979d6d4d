"""Learners' import path ``bnlab.data``: the module lives in :mod:`bnlab.experiments.data`."""

from bnlab._alias import alias

alias(__name__, "bnlab.experiments.data")

if __name__ == "__main__":  # `python -m bnlab.data` (`make data`): find or fetch the files
    from bnlab.experiments.datafiles import main

    raise SystemExit(main())
