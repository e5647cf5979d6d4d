"""Learners' import path ``bnlab.check``: the module lives in :mod:`bnlab.teaching.check`."""

from bnlab._alias import alias

alias(__name__, "bnlab.teaching.check")
