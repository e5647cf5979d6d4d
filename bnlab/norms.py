"""Learners' import path ``bnlab.norms``: the module lives in :mod:`bnlab.nn.norms`."""

from bnlab._alias import alias

alias(__name__, "bnlab.nn.norms")
