"""Learners' import path ``bnlab.models``: the module lives in :mod:`bnlab.experiments.models`."""

from bnlab._alias import alias

alias(__name__, "bnlab.experiments.models")
