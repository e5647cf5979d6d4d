"""Learners' import path ``bnlab.train``: the module lives in :mod:`bnlab.experiments.train`."""

from bnlab._alias import alias

alias(__name__, "bnlab.experiments.train")
