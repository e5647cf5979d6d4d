"""Learners' import path ``bnlab.functional``: the module lives in :mod:`bnlab.nn.functional`."""

from bnlab._alias import alias

alias(__name__, "bnlab.nn.functional")
