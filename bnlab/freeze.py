"""Learners' import path ``bnlab.freeze``: the module lives in :mod:`bnlab.inference.freeze`."""

from bnlab._alias import alias

alias(__name__, "bnlab.inference.freeze")
