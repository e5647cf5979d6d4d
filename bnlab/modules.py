"""Learners' import path ``bnlab.modules``: the module lives in :mod:`bnlab.nn.modules`."""

from bnlab._alias import alias

alias(__name__, "bnlab.nn.modules")
