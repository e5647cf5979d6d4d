"""Learners' import path ``bnlab.widgets``: the module lives in :mod:`bnlab.teaching.widgets`."""

from bnlab._alias import alias

alias(__name__, "bnlab.teaching.widgets")
