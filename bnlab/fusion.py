"""Learners' import path ``bnlab.fusion``: the module lives in :mod:`bnlab.inference.fusion`."""

from bnlab._alias import alias

alias(__name__, "bnlab.inference.fusion")
